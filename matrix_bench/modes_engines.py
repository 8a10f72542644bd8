"""vLLM and SGLang in the matrix: one engine per run, in this process's environment.

Each engine runs where it is installed (scripts/setup-vllm.sh, scripts/setup-sglang.sh), so
`python -m matrix_bench --engines vllm` runs from the vLLM venv. One engine serves every cell and
mode; modes rotate within each repeat as for HF. A cell of batch b is b requests submitted at
once with max_num_seqs / max_running_requests = b, so the engine batches them together.

Modes: off, dmi, dmi-drop, dmi-null, dmi-pause, dmi-keep-pages (as for HF; dmi-discard too for vLLM, whose
worker runs in this process here), and for SGLang `sglang-hidden-states`: SGLang's
own return_hidden_states (the final norm's output only, sent back as lists).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import dmi

from .modes_hf import PeakRSS, capture_spec, close_facts

ENGINE_MODES = {"vllm": ("off", "dmi", "dmi-drop", "dmi-null", "dmi-discard", "dmi-pause", "dmi-keep-pages"),
                "sglang": ("off", "dmi", "dmi-drop", "dmi-null", "dmi-pause", "dmi-keep-pages", "sglang-hidden-states")}
SETUP = {"vllm": "scripts/setup-vllm.sh", "sglang": "scripts/setup-sglang.sh"}


def unavailable(engine: str) -> str | None:
    try:
        mod = __import__(engine)
    except ImportError:
        mod = None
    if mod is None or getattr(mod, "__file__", None) is None:  # a namespace folder is not the engine
        return f"skipped: {engine} not installed here; see {SETUP[engine]}"  # fits the results' status column
    return None


def model_dir(name: str, work: str) -> str:
    from dmi.tiny import build_tiny_model

    from .models import SHAPES

    if name not in SHAPES:
        return name
    shape = dict(SHAPES[name])
    return str(build_tiny_model("qwen3", Path(work) / f"bench-{name}", **shape))


class _VLLM:
    def __init__(self, path: str, dtype: str, batch: int, max_len: int, device: str):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams, TokensPrompt

        self._sp, self._tp = SamplingParams, TokensPrompt
        kw = dict(kv_cache_memory_bytes=max(256 << 20, batch * max_len * 2**14)) if device == "cpu" else {}
        self.engine = LLM(model=path, skip_tokenizer_init=True, dtype=dtype, max_model_len=max_len,
                          max_num_seqs=batch, seed=0, enforce_eager=True, enable_prefix_caching=False, **kw)

    def generate(self, prompts: list[list[int]], decode: int, mode: str) -> None:
        params = self._sp(max_tokens=decode, min_tokens=decode, temperature=0, ignore_eos=True, detokenize=False)
        self.engine.generate([self._tp(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def close(self) -> None:
        del self.engine


class _SGLang:
    def __init__(self, path: str, dtype: str, batch: int, max_len: int, device: str):
        if device == "cpu":  # the CPU stand-ins the SGLang tests use (tests/sglang/cpu)
            cpu = Path(__file__).resolve().parents[1] / "tests" / "sglang" / "cpu"
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(cpu), os.environ.get("PYTHONPATH")) if p)
            sys.path.insert(0, str(cpu))
        import sglang

        extra = dict(attention_backend="torch_native", disable_cuda_graph=True) if device == "cpu" else {}
        self.engine = sglang.Engine(model_path=path, device=device, skip_tokenizer_init=True, dtype=dtype,
                                    max_total_tokens=batch * max_len + 256, max_running_requests=batch,
                                    disable_radix_cache=True, enable_return_hidden_states=True,
                                    log_level="error", **extra)

    def generate(self, prompts: list[list[int]], decode: int, mode: str) -> None:
        params = {"max_new_tokens": decode, "temperature": 0, "ignore_eos": True}  # ignore_eos: exactly max
        self.engine.generate(input_ids=prompts, sampling_params=params,
                             return_hidden_states=mode == "sglang-hidden-states")

    def close(self) -> None:
        self.engine.shutdown()


RUNNERS = {"vllm": _VLLM, "sglang": _SGLang}


def run_engine(engine: str, args, modes: list[str], hooks: list[str], row, ints, log) -> list[dict]:
    """Every cell and mode of one engine; `row` builds a result row as for HF."""
    import itertools

    import torch

    rows: list[dict] = []
    batches, decodes = ints(args.batch_sizes), ints(args.decode_lens)
    why = unavailable(engine)
    bad = [m for m in modes if m not in ENGINE_MODES[engine]]
    for b, d in itertools.product(batches, decodes):
        rows += [row(engine, m, b, d, args.prompt_len, -1, status=why or f"not applicable to {engine}")
                 for m in modes if why or m in bad]
    runnable = [] if why else [m for m in modes if m not in bad]
    if why or bad:
        log(f"matrix_bench: {engine}: {why or 'modes not applicable: ' + ', '.join(bad)}")
    if not runnable:
        return rows
    with tempfile.TemporaryDirectory() as work:
        path = model_dir(args.model, work)
        runner = RUNNERS[engine](path, args.dtype, max(batches), args.prompt_len + max(decodes) + 8, args.device)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).vocab_size
        try:
            for b, d in itertools.product(batches, decodes):
                g = torch.Generator().manual_seed(b * 1000 + d)
                prompts = torch.randint(1, min(vocab, 250), (b, args.prompt_len), generator=g).tolist()
                runner.generate(prompts, min(d, 2), "off")  # warm-up
                for r in range(args.repeats):
                    k = r % len(runnable)
                    for m in runnable[k:] + runnable[:k]:
                        rows.append(_once(runner, engine, m, prompts, b, d, r, args, hooks, work, row))
                    log(f"matrix_bench: {engine} batch {b} decode {d} repeat {r + 1}/{args.repeats} done")
        finally:
            runner.close()
    return rows


def _once(runner, engine, mode, prompts, b, d, r, args, hooks, work, row) -> dict:
    session = None
    if mode.startswith("dmi"):
        sink = os.path.join(work, f"{engine}-{mode}-{b}-{d}-{r}.h5")
        session = dmi.attach(runner.engine, capture_spec(mode, hooks, args.ring_bytes, sink))
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        runner.generate(prompts, d, mode)
        facts = {}
        if session is not None:  # persisted: timed until the file is closed, as for HF
            facts.update(close_facts(session))
        seconds = time.perf_counter() - t0
    if session is not None and os.path.exists(sink):  # as HF's modes and baselines do: the page
        os.unlink(sink)                                # cache of old runs' files is not kept
    facts["peak_mem"] = rss.peak
    return row(engine, mode, b, d, args.prompt_len, r, seconds=seconds, **facts)
