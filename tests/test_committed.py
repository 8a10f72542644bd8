"""`committed` in the live books: rows the sink has made durable, distinct from `written`
(handed to the sink). A reader trusts only committed rows, so a caller watching a live run
must be able to tell the two apart."""
from __future__ import annotations

import time

import torch

import dmi
from dmi.plugins import hookimpl, manager
from dmi.sinks.hdf5 import HDF5Sink
from helpers import assert_books_balance

PAD, NO_EOS = 257, 319
HOOKS = ["blocks.*.hook_resid_post"]


def _generate(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    return model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=NO_EOS)


def _wait_written(s, timeout=30.0) -> dict:
    """The drain runs on its own clock: wait until every produced row reached the sink."""
    end = time.monotonic() + timeout
    while True:
        rows = s.stats()["rows"]
        if rows["in_flight"] == 0 and rows["written"] > 0 or time.monotonic() > end:
            return rows
        time.sleep(0.02)


def test_rows_written_are_committed_only_when_the_sink_commits(load, tmp_path):
    model = load("qwen3")
    out = str(tmp_path / "c.h5")
    # No timed commit during the test: rows wait in the sink until the flush.
    spec = dmi.CaptureSpec(hooks=HOOKS, sink={"kind": "hdf5", "path": out, "flush_every_s": 3600})
    with dmi.attach(model, spec) as s:
        _generate(model)
        before = _wait_written(s)
        assert before["written"] == before["produced"] > 0
        assert before["committed"] == 0, before
        s.flush()
        after = s.stats()
        assert after["rows"]["committed"] == after["rows"]["written"] == before["written"]
        for hook, c in after["hooks"].items():
            assert c["committed"] == c["written"], (hook, c)
    assert_books_balance(after)
    with dmi.open(out) as run:   # the file holds exactly what the session counted committed
        assert run.stats["rows"]["committed"] == after["rows"]["committed"]


class _NoCommitSink(HDF5Sink):
    def flush(self):
        raise OSError("the volume went read-only")


class _NoCommitPlugin:
    @hookimpl
    def dmi_sink_for(self, sink_spec):
        if isinstance(sink_spec, dict) and sink_spec.get("kind") == "no-commit":
            return _NoCommitSink(sink_spec["path"], flush_every_s=3600)
        return None


def test_a_sink_that_cannot_commit_leaves_committed_below_written(load, tmp_path):
    model = load("qwen3")
    plugin = _NoCommitPlugin()
    manager().register(plugin, name="test-no-commit-sink")
    try:
        spec = dmi.CaptureSpec(hooks=HOOKS, sink={"kind": "no-commit", "path": str(tmp_path / "n.h5")})
        with dmi.attach(model, spec) as s:
            _generate(model)
            _wait_written(s)
            s.flush()
            stats = s.stats()
    finally:
        manager().unregister(plugin)
    assert stats["rows"]["written"] > 0
    assert stats["rows"]["committed"] == 0, stats["rows"]
    assert any("read-only" in e for e in stats["errors"])


def test_memory_rows_are_committed_as_they_are_written(load):
    model = load("qwen3")
    with dmi.attach(model, dmi.CaptureSpec(hooks=HOOKS, sink="memory")) as s:
        _generate(model)
        rows = _wait_written(s)
        assert rows["committed"] == rows["written"] == rows["produced"] > 0, rows
        cache = s.cache
        assert sum(cache.num_rows(h) for h in cache.hooks) == rows["committed"]
