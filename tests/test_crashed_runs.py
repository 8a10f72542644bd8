"""Reading a run whose writer never closed it, or a file cut short (issue 18): the books of the
last commit, every hook the spec named, and `salvage=True` for a truncated file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import dmi
from dmi.errors import RunFileError
from dmi.reader.summary import summarize
from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta
from dmi.sinks.hdf5 import HDF5Sink

A = HookInfo("blocks.0.hook_resid_post", "float32", (64,))
B = HookInfo("blocks.1.hook_resid_post", "float32", (64,))
LOGITS = HookInfo("hook_logits", "float32", (64,))   # named by the spec, never written below


def _meta() -> RunMeta:
    names = [A.name, B.name, LOGITS.name]
    return RunMeta(dmi_version="0.1.0", engine="hf", model="tiny", model_config={},
                   spec_json=json.dumps({"hooks": names}), extra={"hooks": names})


def _write(sink: HDF5Sink, steps: int, requests: int = 4, gaps: bool = True, first: int = 0) -> dict:
    """Steps first.. of `requests` new requests each, one row per request and hook, valued by
    request number; returns {(hook, request): row}."""
    want: dict = {}
    for s in range(first, first + steps):
        rids = [f"r{s * requests + i}" for i in range(requests)]
        for info, base in ((A, 0.0), (B, 1000.0)):
            data = np.stack([np.full(64, base + s * requests + i, np.float32) for i in range(requests)])
            sink.write(RowBlock(info, data, rids, np.zeros(requests, np.int64), np.full(requests, s, np.int64)))
            for i, r in enumerate(rids):
                want[(info.name, r)] = data[i]
        if gaps:
            sink.write_gaps(GapBlock(B.name, rids[:1], np.array([1]), np.array([s]), "ring_full"))
    return want


def _crashed_copy(tmp_path, stats_provider=None, steps: int = 6):
    """A run as a killed writer leaves it: committed, never closed (a copy taken after a commit)."""
    live, crashed = tmp_path / "live.h5", tmp_path / "crashed.h5"
    sink = HDF5Sink(str(live))
    sink.stats_provider = stats_provider
    sink.open(_meta())
    want = _write(sink, steps)
    sink.flush()
    shutil.copy(live, crashed)
    sink.close({}, complete=True)
    return crashed, want


def test_a_crashed_run_has_the_books_of_its_last_commit(tmp_path):
    books = {"hooks": {A.name: {"produced": 24, "filtered": 0, "written": 24, "dropped": 0},
                       B.name: {"produced": 30, "filtered": 0, "written": 24, "dropped": 6}},
             "rows": {"produced": 54, "filtered": 0, "written": 48, "dropped": 6}, "steps": 6}
    crashed, _ = _crashed_copy(tmp_path, stats_provider=lambda: books)
    with dmi.open(crashed) as run:
        assert not run.complete
        stats = run.stats
        assert stats["steps"] == 6 and stats["rows"]["dropped"] == 6
        assert stats["hooks"][A.name] == {**books["hooks"][A.name], "committed": 24}
        assert stats["hooks"][B.name]["committed"] == 24 and stats["hooks"][LOGITS.name] == {"committed": 0}
        assert stats["rows"]["committed"] == 48
        text = summarize(run)
    assert "dropped rows: 6 (stats), 6 (gaps)" in text


def test_a_run_without_books_does_not_claim_zero_drops(tmp_path):
    crashed, _ = _crashed_copy(tmp_path)   # a writer without a stats provider
    with dmi.open(crashed) as run:
        assert run.stats["rows"] == {"committed": 48}
        text = summarize(run)
    assert "(stats)" not in text and "none recorded" in text
    assert "dropped rows: 6 (gaps)" in text


def test_every_named_hook_is_listed_and_reads_empty(tmp_path):
    crashed, want = _crashed_copy(tmp_path)
    with dmi.open(crashed) as run:
        assert run.hooks == [A.name, B.name, LOGITS.name]
        assert run.num_rows(LOGITS.name) == 0 and run.dtype(LOGITS.name) is None
        assert run.positions(LOGITS.name, "r0").tolist() == []
        assert run.steps(LOGITS.name, "r0").tolist() == []
        assert run.get(LOGITS.name, "r0").numel() == 0
        assert run.gaps(LOGITS.name) == [] and len(run.gaps(B.name)) == 6
        assert run.read_rows(LOGITS.name).numel() == 0
        assert torch.equal(run.get(A.name, "r5")[0], torch.from_numpy(want[(A.name, "r5")]))
        with pytest.raises(KeyError, match="did you mean"):
            run.positions("hook_logitz", "r0")
        assert "hook_logits" in summarize(run)


def _big_run(tmp_path, steps: int = 120):
    path = tmp_path / "big.h5"
    sink = HDF5Sink(str(path), chunk_bytes=16 << 10)
    sink.open(_meta())
    want = {}
    for first in range(0, steps, 10):  # a commit every 10 steps, as a session's flushes would
        want.update(_write(sink, 10, first=first))
        sink.flush()
    sink.close({"rows": {"produced": 1}}, complete=True)
    return path, want


def test_a_truncated_file_is_named_and_salvaged(tmp_path):
    path, want = _big_run(tmp_path)
    size = os.path.getsize(path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: int(size * 0.97)])
    with pytest.raises(RunFileError) as e:
        dmi.open(cut)
    assert str(cut) in str(e.value) and "truncated" in str(e.value) and "salvage=True" in str(e.value)

    with dmi.open(cut, salvage=True) as run:
        assert not run.complete and run.meta["salvaged"]["size"] == int(size * 0.97)
        got = {h: run.num_rows(h) for h in (A.name, B.name)}
        assert 0 < min(got.values()) and sum(got.values()) < 2 * 480  # some rows lost, most kept
        checked = 0
        for hook in (A.name, B.name):
            for r in run.requests:
                rows = run.get(hook, r)
                assert len(rows) <= 1
                if len(rows):   # a row read back is the row written, never zeros past the cut
                    assert torch.equal(rows[0], torch.from_numpy(want[(hook, r)]))
                    checked += 1
        assert checked == sum(got.values())
        assert len(run.gaps(B.name)) <= len(run.requests)
        assert "salvaged" in summarize(run)


def test_a_file_cut_before_its_index_says_which_format_could(tmp_path):
    path, _ = _big_run(tmp_path, steps=4)
    cut = tmp_path / "stub.h5"
    cut.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(RunFileError) as e:
        dmi.open(cut, salvage=True)
    msg = str(e.value)
    assert str(cut) in msg and "1500 of its" in msg and "Parquet" in msg


def test_salvage_of_a_whole_file_reads_it_all(tmp_path):
    path, want = _big_run(tmp_path, steps=10)
    with dmi.open(path, salvage=True) as run:
        assert run.complete and "salvaged" not in run.meta
        assert run.num_rows(A.name) == 40 and run.requests == [f"r{i}" for i in range(40)]


CHILD = r"""
import sys, torch, dmi
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
spec = dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post", "hook_logits"], ring={"bytes": 1 << 20}, sink=sys.argv[2])
session = dmi.attach(model, spec)
session.sink.stats_provider = session.stats   # what the session sets once it supports it
model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
session.flush()
print("ack", flush=True)
import time
time.sleep(60)
"""


def test_a_killed_session_leaves_its_books(tiny_dirs, tmp_path):
    out = tmp_path / "killed.h5"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_dirs["qwen3"]), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout.readline().startswith("ack")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    with dmi.open(out) as run:
        assert not run.complete
        stats = run.stats
        # 3 prompt + 2 fed-back tokens for the residual; logits rows from the last prompt token on
        assert stats["hooks"]["blocks.0.hook_resid_post"]["produced"] == 5
        assert stats["hooks"]["blocks.0.hook_resid_post"]["committed"] == 5
        assert stats["hooks"]["hook_logits"]["committed"] == 3
