"""Measure how big a small HDF5 run's file is against the bytes of its rows (issue 17).

    python scripts/small_run_size.py [--hooks all] [--new-tokens 4]
Prints rows bytes, file bytes and the ratio; the sink keeps file <= 1.5 x rows + fixed overhead.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch


def measure(hooks: list[str], new_tokens: int, prompts: int = 3) -> dict:
    from transformers import AutoModelForCausalLM

    import dmi
    from dmi.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as d:
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model("qwen3", os.path.join(d, "m")),
                                                     attn_implementation="eager").eval()
        out = os.path.join(d, "run.h5")
        ids = torch.arange(10, 10 + 6 * prompts).reshape(prompts, 6)
        with dmi.attach(model, dmi.CaptureSpec(hooks=hooks, sink=out)):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
        run = dmi.open(out)
        rows = sum(run.data_bytes(h) for h in run.hooks)
        index = sum(20 * run.num_rows(h) for h in run.hooks)
        size = os.path.getsize(out)
        return {"hooks": len(run.hooks), "row_bytes": rows, "index_bytes": index, "file_bytes": size,
                "ratio": size / rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hooks", default="all")
    p.add_argument("--new-tokens", type=int, default=4)
    a = p.parse_args()
    m = measure(a.hooks.split(","), a.new_tokens)
    print(f"{m['hooks']} hooks: rows {m['row_bytes'] / 1e6:.3f} MB (+{m['index_bytes'] / 1e6:.3f} MB index), "
          f"file {m['file_bytes'] / 1e6:.3f} MB, ratio {m['ratio']:.2f}")


if __name__ == "__main__":
    main()
