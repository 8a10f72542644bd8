"""Engine throughput without capture vs with dmi capturing every layer's residual stream
plus the logits, side by side on one in-process eager engine (CPU).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python tests/vllm/bench_overhead.py [tiny|small]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

SHAPES = {"tiny": {}, "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                                 "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1536}}


def main(shape: str = "tiny", rounds: int = 5, n_req: int = 16, new_tokens: int = 64) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    import dmi
    from dmi.tiny import build_tiny_model

    tmp = tempfile.mkdtemp()
    model = build_tiny_model("qwen3", os.path.join(tmp, shape), **SHAPES[shape])
    llm = LLM(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=512, max_num_seqs=8,
              seed=0, kv_cache_memory_bytes=256 * 2**20, enforce_eager=True, enable_prefix_caching=False)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 250 + 1 for i in range(32 + 4 * j)]) for j in range(n_req)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)

    cpu_ms: dict[str, list[float]] = {"plain": [], "dmi": []}

    def run(kind: str = "plain") -> float:
        # CPU time of this process (engine, worker and dmi's drain thread all live here) is
        # what capture costs; wall time also shows whatever else the shared machine runs.
        t, c = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        cpu_ms[kind].append(1000 * (time.process_time() - c) / n)
        return n / (time.perf_counter() - t)

    run()  # warm-up
    plain, captured = [], []
    for r in range(rounds):
        plain.append(run())
        spec = dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post", "hook_logits"], sink=os.path.join(tmp, f"{r}.h5"))
        with dmi.attach(llm, spec) as s:
            captured.append(run("dmi"))
        assert s.stats()["hooks"]["hook_logits"]["written"] == n_req * new_tokens
    import statistics

    best_p, best_c = max(plain), max(captured)
    med_p, med_c = statistics.median(plain), statistics.median(captured)
    print(f"shape={shape} requests={n_req} new_tokens={new_tokens} max_num_seqs=8 rounds={rounds}")
    print(f"no capture : {best_p:8.1f} tok/s (rounds: {', '.join(f'{x:.1f}' for x in plain)})")
    print(f"dmi capture: {best_c:8.1f} tok/s (rounds: {', '.join(f'{x:.1f}' for x in captured)})")
    cp, cd = min(cpu_ms["plain"][1:]), min(cpu_ms["dmi"])
    print(f"CPU time   : {cp:.3f} ms/token no capture, {cd:.3f} ms/token with dmi "
          f"(+{100 * (cd / cp - 1):.1f}%, best of each)")
    print(f"overhead   : {100 * (best_p / best_c - 1):.1f}% best of each, {100 * (med_p / med_c - 1):.1f}% median "
          f"(rounds alternate, so load from other processes hits both)")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["tiny"]))
