from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch
from helpers import assert_matches


def require_vllm():
    """Skip without vLLM (the main venv), unless DMI_REQUIRE_ENGINES names it (CI's vLLM venv)."""
    # Not plain "vllm": without vLLM installed, this test folder itself imports as a namespace
    # package of that name.
    if "vllm" in os.environ.get("DMI_REQUIRE_ENGINES", ""):
        import vllm.entrypoints.llm
        return vllm.entrypoints.llm
    return pytest.importorskip("vllm.entrypoints.llm")

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33], [41, 42, 43, 44, 45, 46, 47],
           [51, 52]]
MAX_TOKENS = [3, 6, 2, 5, 4]


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_llm(model_dir, **kw):
    from vllm import LLM

    args = {"model": str(model_dir), "skip_tokenizer_init": True, "dtype": "float32", "max_model_len": 512,
            "max_num_seqs": 2, "seed": 0, "kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True}
    args.update(kw)
    return LLM(**args)


def shutdown(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, detokenize=False) for m in max_tokens]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def fed(out) -> list[int]:
    """Tokens the engine computed for a request: the prompt, then every generated token but
    the last (sampled, never fed back)."""
    return list(out.prompt_token_ids) + list(out.outputs[0].token_ids)[:-1]


def check_outputs(run, hf_model, outs, hooks=None) -> None:
    hooks = hooks or run.hooks
    assert sorted(run.requests) == sorted(o.request_id for o in outs)
    for o in outs:
        assert_matches(run, hf_model, o.request_id, fed(o), hooks, logits_from=len(o.prompt_token_ids) - 1)


def greedy_hf(hf_model, prompt, n) -> list[int]:
    """What the engine should sample: HF greedy continuation (same weights, float32)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf_model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]
