"""dmi.open on a tensor-parallel run: rank files written through the HDF5 sink, each holding its
slice of the sliced hooks, read back whole and equal to the unsliced rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dmi
from dmi.reader.summary import summarize
from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta
from dmi.sinks.hdf5 import HDF5Sink

HEADS, KV, D, MLP = 4, 1, 3, 6
# rank -> hook -> shard; kv has one head, so both ranks hold (replicate) it
# hook_attn_out: each rank holds a partial sum (SGLang's unreduced attention output), half the row
SHARDS = {
    0: {"blocks.0.attn.hook_q": (0, 0, 2, HEADS), "blocks.0.attn.hook_k": (0, 0, 1, KV),
        "blocks.0.mlp.hook_post": (0, 0, 3, MLP), "blocks.0.hook_attn_out": (-1, 0, 1, 2)},
    1: {"blocks.0.attn.hook_q": (0, 2, 4, HEADS), "blocks.0.attn.hook_k": (0, 0, 1, KV),
        "blocks.0.mlp.hook_post": (0, 3, 6, MLP), "blocks.0.hook_attn_out": (-1, 1, 2, 2)},
}
FULL_SHAPES = {"blocks.0.hook_resid_post": (5,), "blocks.0.attn.hook_q": (HEADS, D), "blocks.0.attn.hook_k": (KV, D),
               "blocks.0.hook_attn_out": (5,), "blocks.0.mlp.hook_post": (MLP,)}
# (step, request, positions): "a" prefills 3 rows, then both decode
STEPS = [(0, "a", [0, 1, 2]), (1, "a", [3]), (1, "b", [0, 1]), (2, "a", [4]), (2, "b", [2]), (3, "b", [3])]
DROPPED = ("blocks.0.attn.hook_q", "a", 3)   # rank 1's ring was full for this row


def _full_rows():
    g = torch.Generator().manual_seed(0)
    return {h: {(r, p): torch.randn(shape, generator=g) for _, r, ps in STEPS for p in ps}
            for h, shape in FULL_SHAPES.items()}


def _write_rank(path, rank, full):
    sink = HDF5Sink(path)
    sink.open(RunMeta(dmi_version=dmi.__version__, engine="test", model="none", model_config={},
                      spec_json=dmi.CaptureSpec().to_json(), extra={"tp_rank": rank, "tp_size": 2}))
    hooks = [h for h in FULL_SHAPES if rank == 0 or h in SHARDS[rank]]
    for step, req, ps in STEPS:
        for h in hooks:
            shard = SHARDS[rank].get(h)
            keep = [p for p in ps if rank == 0 or (h, req, p) != DROPPED]
            if len(keep) < len(ps):
                sink.write_gaps(GapBlock(h, [req], np.array([ps[-1]]), np.array([step]), "ring_full"))
            if not keep:
                continue
            rows = torch.stack([full[h][(req, p)] for p in keep])
            if shard is not None and shard[0] == -1:
                rows = rows / 2  # (exact: the merge's sum gives the row back bit for bit)
            elif shard is not None:
                rows = rows.narrow(shard[0] + 1, shard[1], shard[2] - shard[1])
            info = HookInfo(h, "float32", tuple(rows.shape[1:]), shard=shard)
            sink.write(RowBlock(info, rows.numpy(), [req] * len(keep), np.array(keep), np.full(len(keep), step)))
    sink.close({"rank": rank}, complete=True)


@pytest.fixture
def tp_run(tmp_path):
    full = _full_rows()
    path = str(tmp_path / "tp.h5")
    _write_rank(path, 0, full)
    _write_rank(path + ".rank1", 1, full)
    return path, full


def test_sliced_hooks_read_back_whole(tp_run):
    path, full = tp_run
    with dmi.open(path) as run:
        assert run.complete and run.tp_size == 2
        assert run.shard("blocks.0.attn.hook_q") is None and run.ranks[1].shard("blocks.0.attn.hook_q") == (0, 2, 4, 4)
        assert sorted(run.requests) == ["a", "b"]
        for h, shape in FULL_SHAPES.items():
            assert run.shape(h) == shape
            for req in ("a", "b"):
                pos = run.positions(h, req).tolist()
                want = [p for _, r, ps in STEPS if r == req for p in ps if (h, req, p) != DROPPED]
                assert pos == want, (h, req)
                expect = torch.stack([full[h][(req, p)] for p in pos])
                assert torch.equal(run.get(h, req), expect), (h, req)
                assert len(run.steps(h, req)) == len(pos)
        # The row rank 1 dropped is missing from the merge and recorded as its gap, once.
        assert [(g["hook"], g["request"], g["position"], g["reason"]) for g in run.gaps()] == [(*DROPPED, "ring_full")]
        assert [s["rank"] for s in run.stats["tp_ranks"]] == [0, 1]
        # Arrival order: aligned hooks come back whole; q (a row only rank 0 holds) cannot be aligned.
        whole = run.read_rows("blocks.0.mlp.hook_post")
        assert whole.shape == (run.num_rows("blocks.0.mlp.hook_post"), MLP)
        with pytest.raises(ValueError, match="different rows"):
            run.read_rows("blocks.0.attn.hook_q")
        text = summarize(run)
        assert "blocks.0.attn.hook_q" in text and "tp.h5.rank1" in text


def test_rank_zero_alone_and_a_missing_rank(tp_run):
    path, full = tp_run
    with dmi.open(path, merge_ranks=False) as first:
        assert first.shape("blocks.0.attn.hook_q") == (2, D)
        assert first.shard("blocks.0.attn.hook_q") == (0, 0, 2, HEADS)
        assert first.shard("blocks.0.hook_resid_post") is None
        assert torch.equal(first.get("blocks.0.attn.hook_q", "a"),
                           torch.stack([full["blocks.0.attn.hook_q"][("a", p)][:2] for p in range(5)]))
    import os

    os.rename(path + ".rank1", path + ".moved")
    with pytest.raises(FileNotFoundError, match=r"rank 1's file .*tp\.h5\.rank1.* is missing"):
        dmi.open(path)


def test_merged_run_has_the_run_views(tp_run):
    """stack and run[hook, request] on a tensor-parallel run give the merged (whole) rows."""
    path, full = tp_run
    with dmi.open(path) as run:
        hook = "blocks.0.attn.hook_q"
        values, mask = run.stack(hook)
        assert values.shape == (2, 5, HEADS, D)
        for i, req in enumerate(run.requests):
            pos = run.positions(hook, req)
            assert mask[i].nonzero().flatten().tolist() == pos.tolist()
            assert torch.equal(values[i][pos], run[hook, req])
            assert torch.equal(values[i][pos], torch.stack([full[hook][(req, int(p))] for p in pos]))
        with pytest.raises(KeyError, match="no request has the id 0"):
            run.get(hook, 0)
