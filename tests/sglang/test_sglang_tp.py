"""SGLang tensor parallel (tp_size=2: two scheduler processes over gloo, one CPU core each): every
rank captures its slice of the split hooks (q/k/v/z heads, MLP features) and its partial sum of the
attention and MLP outputs into its own file with shard attributes, rank 0 also the whole rows, and
dmi.open merges the rank files into rows equal to HF's on the same weights (random norm weights;
Qwen3's per-head q/k norms)."""
from __future__ import annotations

import os

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import start_engine

import dmi

pytestmark = pytest.mark.sglang

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]


def _omp_bind() -> str:
    # SGLang binds each CPU rank to a NUMA node unless told otherwise; these machines have one
    # node, so give each rank its own core.
    cpus = sorted(os.sched_getaffinity(0))
    return f"{cpus[0]}|{cpus[1 % len(cpus)]}"


def test_tp2_ranks_merge_to_the_reference(tmp_path, monkeypatch):
    import torch
    from families import save_family_model
    from transformers import AutoModelForCausalLM

    path = save_family_model("qwen3", tmp_path / "qwen3")
    out = str(tmp_path / "cap.h5")
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", _omp_bind())
    engine = start_engine(path, tp_size=2, disable_radix_cache=True)
    try:
        with dmi.attach(engine, {"hooks": ["all"], "sink": out}) as s:
            outs = engine.generate(input_ids=PROMPTS, sampling_params=[
                {"temperature": 0, "ignore_eos": True, "max_new_tokens": m} for m in (3, 2)])
            stats = s.stats()
    finally:
        engine.shutdown()
    assert [r["hooks"] != {} for r in stats["ranks"]] == [True, True]
    assert os.path.exists(out + ".rank1")
    with dmi.open(out, merge_ranks=False) as first, dmi.open(out + ".rank1", merge_ranks=False) as second:
        split = {h for h in first.hooks if first.shard(h) is not None}
        # Rank 1 holds only the split hooks, its halves: 2 of 4 q heads, 1 of 2 kv heads, 64 of 128 features.
        assert set(second.hooks) == split and "blocks.1.attn.hook_v" in split and "blocks.0.hook_resid_post" not in split
        assert first.shard("blocks.0.attn.hook_q") == (0, 0, 2, 4) and second.shard("blocks.0.attn.hook_q") == (0, 2, 4, 4)
        assert second.shard("blocks.1.attn.hook_k") == (0, 1, 2, 2)
        assert second.shard("blocks.0.mlp.hook_post") == (0, 64, 128, 128)
        assert first.shape("blocks.0.attn.hook_z") == (2, 32)
        # SGLang leaves the attention's and MLP's all-reduce to the layer: each rank's module output
        # is a partial sum (shard dim -1), which dmi.open adds up.
        assert first.shard("blocks.0.hook_attn_out") == (-1, 0, 1, 2)
        assert second.shard("blocks.1.hook_mlp_out") == (-1, 1, 2, 2)
    run = dmi.open(out)
    assert run.complete and run.tp_size == 2
    assert run.shape("blocks.0.attn.hook_q") == (4, 32) and run.shape("blocks.0.mlp.hook_post") == (128,)
    for rank_stats in run.stats["tp_ranks"]:
        assert_books_balance(rank_stats)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    for p, o in zip(PROMPTS, outs):
        assert_request_matches(run, hf, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)
    run.close()


def test_tp_rank_files_need_a_path_sink():
    """Refused at attach, before any scheduler is asked: every rank past 0 writes its own file."""
    from dmi.adapters.sglang.frontend import validate
    from dmi.adapters.sglang.hooks import HookMap
    from dmi.adapters.sglang.tables import qwen3
    from dmi.errors import SpecError
    from dmi.spec import CaptureSpec
    from dmi.tiny import tiny_config

    cfg = tiny_config("qwen3")
    hmap = HookMap(qwen3.TABLE, cfg, tp_size=2)
    with pytest.raises(SpecError, match="tensor-parallel ranks"):
        validate(CaptureSpec.parse({"hooks": ["resid"], "sink": {"kind": "memory"}}), hmap)
    # Rank 0 binds every hook, its slice of the split ones; rank 1 only the split ones.
    rank1 = HookMap(qwen3.TABLE, cfg, tp_size=2, tp_rank=1)
    names = ["blocks.0.attn.hook_q", "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    assert [(b.name, b.shard) for b in hmap.bind(names)] == [
        ("blocks.0.attn.hook_q", (0, 0, 2, 4)), ("blocks.0.hook_resid_post", None),
        ("blocks.1.mlp.hook_post", (0, 0, 64, 128))]
    assert [(b.name, b.shard) for b in rank1.bind(names)] == [("blocks.0.attn.hook_q", (0, 2, 4, 4)),
                                                              ("blocks.1.mlp.hook_post", (0, 64, 128, 128))]
    assert rank1.bind(["blocks.0.attn.hook_q"])[0].row_bytes == 2 * 32 * 4  # its 2 heads, float32
