"""Engine throughput on CPU with no capture, with dmi capturing every layer's residual stream
plus the logits, and with SGLang's own return_hidden_states (final norm only, sent back to the
caller as lists), side by side on one engine, rounds interleaved.

    .venv-sglang/bin/python tests/sglang/bench_overhead.py [--requests 16] [--tokens 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import sglang_env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()

    import dmi
    from dmi.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="dmi-sgl-bench-"))
    model = build_tiny_model("qwen3", tmp / "model", hidden_size=a.hidden, num_hidden_layers=a.layers,
                             num_attention_heads=a.hidden // 32, num_key_value_heads=a.hidden // 64,
                             intermediate_size=2 * a.hidden)
    engine = sglang_env.start_engine(model, disable_radix_cache=True, enable_return_hidden_states=True,
                                     max_total_tokens=a.requests * (a.prompt + a.tokens) + 256)
    prompts = [[(7 * r + i) % 250 + 1 for i in range(a.prompt)] for r in range(a.requests)]
    params = {"temperature": 0, "max_new_tokens": a.tokens, "ignore_eos": True}
    hooks = ["blocks.*.hook_resid_post", "hook_logits"]

    def plain():
        return engine.generate(input_ids=prompts, sampling_params=params)

    files = iter(range(1 << 20))
    generate_only: list[float] = []

    def with_dmi():
        sink = str(tmp / f"cap{next(files)}.h5")
        with dmi.attach(engine, {"hooks": hooks, "sink": sink, "ring": {"bytes": 256 << 20}}):
            t = time.perf_counter()
            out = engine.generate(input_ids=prompts, sampling_params=params)
            generate_only.append(time.perf_counter() - t)
        return out

    def hidden():
        return engine.generate(input_ids=prompts, sampling_params=params, return_hidden_states=True)

    modes = {"no capture": plain, "dmi resid_post x all layers + logits": with_dmi,
             "sglang return_hidden_states": hidden}
    plain()  # warm up
    times = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    try:
        for _ in range(a.rounds):
            for m, fn in modes.items():
                c, t = _cpu_seconds(), time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t)
                cpu[m].append(_cpu_seconds() - c)
    finally:
        engine.shutdown()
    times["  of which generate (session open)"] = generate_only
    toks = a.requests * a.tokens
    base = min(times["no capture"])
    print(f"qwen3-shaped random model: hidden {a.hidden}, {a.layers} layers, float32, CPU; {a.requests} requests x "
          f"{a.prompt} prompt + {a.tokens} new tokens; {a.rounds} interleaved rounds "
          f"(dmi rounds include attach and close, which flushes the file)")
    cpu_base = min(cpu["no capture"])
    print("  best of the rounds (other work on a shared machine only slows rounds down); CPU seconds are this "
          "process's and SGLang's, dmi's drain thread included")
    for m, ts in times.items():
        best, c = min(ts), min(cpu.get(m) or [float("nan")])
        print(f"  {m:38s} {toks / best:7.1f} tok/s  x{best / base:.2f} wall  {c:6.2f} CPU s  x{c / cpu_base:.2f} CPU  "
              f"median {toks / statistics.median(ts):7.1f} tok/s  rounds(wall s): {' '.join(f'{t:.2f}' for t in ts)}")


def _cpu_seconds() -> float:
    """CPU time of this process and all its children (SGLang's scheduler and detokenizer)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


if __name__ == "__main__":
    main()
