from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
import tempfile
import time

PRESETS = {
    "cpu-smoke": dict(engines="hf", model="tiny", batch_sizes="1,4", decode_lens="4", prompt_len=8, repeats=1,
                      modes="off,dmi,dmi-null,hf-hidden-states,forward-hook-cpu"),
    "cpu": dict(engines="hf,vllm,sglang", model="small", batch_sizes="1,8,32", decode_lens="16,64", prompt_len=32,
                repeats=5, modes="off,dmi,dmi-null,hf-hidden-states,hf-attentions,forward-hook-cpu,nnsight,"
                                 "sglang-hidden-states"),
    # Sized for one 10-minute call on one GPU (the full paper grid, batch 256 and every baseline,
    # needs far longer and writes hundreds of GB): pass --batch-sizes/--modes to widen it.
    "gpu-paper": dict(engines="hf,vllm,sglang", model="qwen3-4b", batch_sizes="1,16,64",
                      decode_lens="16,128", prompt_len=128, repeats=3, dtype="bfloat16", device="cuda",
                      modes="off,dmi,off-graphs,dmi-graphs,hf-hidden-states"),
}
DEFAULT_HOOKS = "blocks.*.hook_resid_post,hook_logits"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m matrix_bench", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--engines", default="hf")
    p.add_argument("--model", default="tiny", help="local model folder, or a shape: tiny, small, qwen3-4b")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--decode-lens", default="16")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--hooks", default=DEFAULT_HOOKS, help="comma-separated hook names/presets, or a spec file")
    p.add_argument("--modes", default="off,dmi,dmi-null,hf-hidden-states,forward-hook-cpu",
                   help="off, dmi (overload=block), dmi-drop, dmi-null (armed, nothing kept), dmi-discard (everything but "
                        "the sink: rows drained and dropped; HF and vLLM), dmi-pause (drain.schedule "
                        "pause), dmi-keep-pages (the file's written pages stay cached: release_pages false), "
                        "hf-hidden-states, "
                        "hf-attentions, forward-hook-cpu, nnsight (if installed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ring-bytes", type=int, default=256 * 2**20)
    p.add_argument("--sink-delay-ms", type=float, default=0.0,
                   help="make the sink sleep this long per write: the overload policies under a slow sink")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="bench.h5")
    p.add_argument("--report", help="also write a markdown report to this path, and PNG plots beside it")
    p.add_argument("--from", dest="from_file", metavar="BENCH_H5",
                   help="run nothing: render --report (or print the table) from an earlier results file")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.preset:
        given = {a.lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for k, v in PRESETS[args.preset].items():
            if k not in given:
                setattr(args, k, v)
    from .report import markdown, plots
    from .results import Results, read

    if args.from_file:
        rows = read(args.from_file)
    else:
        rows = run_matrix(args)
        Results(args.out).write(rows, attrs=environment(args))
        print(f"matrix_bench: {len(rows)} rows written to {args.out}", file=sys.stderr)
    text = markdown(rows)
    print(text)
    if args.report:
        written = plots(rows, args.report)
        with open(args.report, "w") as f:
            f.write(text + "".join(f"\n![{p}]({p})\n" for p in written))
        print(f"matrix_bench: report {args.report}" + (f", plots {', '.join(written)}" if written else ""),
              file=sys.stderr)
    return 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x]


def run_matrix(args) -> list[dict]:
    import torch

    from .modes_hf import MODES, run_once

    engines = [e for e in str(args.engines).split(",") if e]
    modes = [m for m in str(args.modes).split(",") if m]
    from .modes_hf import unavailable

    from .modes_engines import ENGINE_MODES, run_engine

    known = set(MODES).union(*ENGINE_MODES.values())
    bad = [m for m in modes if m not in known]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {', '.join(sorted(known))}")
    bad = [e for e in engines if e != "hf" and e not in ENGINE_MODES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from hf, {', '.join(ENGINE_MODES)}")
    hooks = _hooks(args.hooks)
    rows: list[dict] = []
    for engine in engines:
        if engine != "hf":
            rows += run_engine(engine, args, modes, hooks, _row, _ints, lambda msg: print(msg, file=sys.stderr))
            continue
        hf_modes = [m for m in modes if m in MODES]
        for b, d in itertools.product(_ints(args.batch_sizes), _ints(args.decode_lens)):
            rows += [_row(engine, m, b, d, args.prompt_len, -1, status="not applicable to hf")
                     for m in modes if m not in MODES]
        from .models import load_model

        device = torch.device(args.device)
        model = load_model(args.model, args.device, getattr(torch, args.dtype))
        vocab = model.config.vocab_size
        skip = {m: unavailable(m) for m in hf_modes if unavailable(m)}
        for m, why in skip.items():
            print(f"matrix_bench: mode {m}: {why}", file=sys.stderr)
        runnable = [m for m in hf_modes if m not in skip]
        with tempfile.TemporaryDirectory() as work:
            for b, d in itertools.product(_ints(args.batch_sizes), _ints(args.decode_lens)):
                rows += [_row(engine, m, b, d, args.prompt_len, -1, status=why) for m, why in skip.items()]
                g = torch.Generator().manual_seed(b * 1000 + d)
                ids = torch.randint(1, vocab, (b, args.prompt_len), generator=g).to(device)
                for m in runnable:  # warm-up, not recorded
                    run_once(model, m, ids, min(d, 2), hooks, args.ring_bytes, work, args.sink_delay_ms / 1e3)
                for r in range(args.repeats):
                    k = r % len(runnable)
                    order = runnable[k:] + runnable[:k]  # rotate: no mode is always first
                    for m in order:
                        if torch.cuda.is_available():
                            torch.cuda.reset_peak_memory_stats()
                        facts = run_once(model, m, ids, d, hooks, args.ring_bytes, work, args.sink_delay_ms / 1e3)
                        rss = facts.pop("peak_rss")
                        rows.append(_row(engine, m, b, d, args.prompt_len, r, **facts,
                                         peak_mem=_peak(device) if device.type == "cuda" else rss))
                    print(f"matrix_bench: {engine} batch {b} decode {d} repeat {r + 1}/{args.repeats} done",
                          file=sys.stderr)
    return rows


def _row(engine, mode, batch, decode, prompt, repeat, seconds=float("nan"), bytes_captured=0, rows_dropped=0,
         close_s=0.0, peak_mem=0, status="ok", cpu_s=float("nan")) -> dict:
    tokens = batch * decode
    return dict(engine=engine, mode=mode, batch=batch, decode_len=decode, prompt_len=prompt, repeat=repeat,
                seconds=seconds, tokens_per_s=tokens / seconds if seconds == seconds else float("nan"),
                step_ms=1000 * seconds / decode if seconds == seconds else float("nan"),
                bytes_captured=bytes_captured, rows_dropped=rows_dropped, close_s=close_s, peak_mem=peak_mem,
                status=status, cpu_s=cpu_s)


def _hooks(s: str) -> list[str]:
    if s.endswith((".json", ".yaml", ".yml")):
        import dmi

        return dmi.CaptureSpec.from_file(s).hooks
    return [h for h in s.split(",") if h]


def _peak(device) -> int:
    """Peak GPU memory allocated since the last reset (CUDA); CPU peaks come from the run itself."""
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def environment(args) -> dict:
    import torch
    import transformers

    import dmi

    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return {"machine": f"{platform.machine()} {platform.processor()} {platform.node()}", "cpus": _cpus(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dmi": dmi.__version__, "git_revision": rev,
            "model": args.model, "hooks": args.hooks, "dtype": args.dtype, "device": args.device,
            "spec": dmi.CaptureSpec(hooks=_hooks(args.hooks), ring={"bytes": args.ring_bytes}).to_json(),
            "sink_delay_ms": args.sink_delay_ms, "prompt_len": args.prompt_len, "repeats": args.repeats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # what a drain could reach at best on this machine: dmi's drain_mb_s compares to this
            "pinned_d2h_mb_s": pinned_copy_mb_s(args.device)}


def pinned_copy_mb_s(device: str, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Device -> pinned host copy bandwidth (best of `repeats`), 0 off a GPU."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return 0.0
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e6


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
