"""Faults in the sink: reported once, inference continues unharmed, what was committed stays readable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dmi
from dmi.plugins import hookimpl, manager
from dmi.sinks.hdf5 import HDF5Sink
from helpers import assert_books_balance
from reference import reference

PAD, NO_EOS = 257, 319


class FailingSink(HDF5Sink):
    """Fails on its n-th write, as a plugin sink with a bug would."""

    def __init__(self, path, fail_at):
        super().__init__(path)
        self.writes = 0
        self.fail_at = fail_at

    def write(self, block):
        self.writes += 1
        if self.writes == self.fail_at:
            raise RuntimeError("the storage backend went away")
        super().write(block)


class FailingPlugin:
    @hookimpl
    def dmi_sink_for(self, sink_spec):
        if isinstance(sink_spec, dict) and sink_spec.get("kind") == "failing":
            return FailingSink(sink_spec["path"], sink_spec["fail_at"])
        return None


@pytest.fixture(scope="module", autouse=True)
def failing_plugin():
    plugin = FailingPlugin()
    manager().register(plugin, name="test-failing-sink")
    yield
    manager().unregister(plugin)


def _generate(model, n=4):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD, eos_token_id=NO_EOS)


def test_a_sink_that_raises_is_reported_once_and_inference_continues(load, tmp_path, caplog):
    model = load("qwen3")
    expected = _generate(model, 6)
    out = str(tmp_path / "f.h5")
    spec = dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post"], sink={"kind": "failing", "path": out, "fail_at": 3})
    with dmi.attach(model, spec) as s:
        got = _generate(model, 6)
        s.flush()
        got2 = _generate(model, 6)
        s.flush()  # in_flight is zero once flushed (the drain runs on its own clock)
        stats = s.stats()
    assert torch.equal(got, expected) and torch.equal(got2, expected)
    errors = [e for e in stats["errors"] if "storage backend went away" in e]
    assert len(errors) == 1
    assert sum("storage backend went away" in r.message for r in caplog.records) == 1
    assert stats["drop_reasons"]["sink_error"] > 0
    assert_books_balance(stats)
    run = dmi.open(out)
    assert not run.complete  # rows were lost: the file must not claim to be complete
    assert run.stats["rows"]["dropped"] == stats["rows"]["dropped"]
    # what reached the sink before the fault is intact and equal to the reference
    seqs = {str(b): [5, 6, 7, 8] if b == 0 else [9, 10, 11, 12] for b in range(2)}
    checked = 0
    for rid, prompt in seqs.items():
        seq = prompt + got[int(rid), 4:-1].tolist()
        ref = reference(model, seq)
        for hook in run.hooks:
            pos = run.positions(hook, rid)
            if len(pos):
                assert (run.get(hook, rid) - ref[hook][pos]).abs().max() < 1e-4
                checked += len(pos)
    assert checked > 0


def test_permission_lost_mid_run_does_not_stop_an_open_file(load, tmp_path):
    """On Linux an open file keeps taking writes after chmod; capture goes on and completes."""
    model = load("qwen3")
    out = tmp_path / "p.h5"
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(out))) as s:
        _generate(model)
        s.flush()
        os.chmod(out, 0o000)
        _generate(model)
    os.chmod(out, 0o600)
    run = dmi.open(out)
    assert run.complete and run.requests == ["0", "1", "2", "3"] and not run.stats["errors"]


def test_output_file_removed_mid_run(load, tmp_path):
    model = load("qwen3")
    out = tmp_path / "r.h5"
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(out))) as s:
        _generate(model)
        s.flush()
        os.remove(out)
        _generate(model)
        s.flush()
        stats = s.stats()
        assert any("was removed or replaced" in e for e in stats["errors"])
        _generate(model)  # still serving
    assert s.stats()["drop_reasons"]["sink_error"] > 0
    assert_books_balance(s.stats())


DISK_FULL = r"""
import resource, signal, sys, torch, dmi
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
spec = dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post", "hook_logits"], sink=sys.argv[2])
outs = []
with dmi.attach(model, spec) as s:
    for i in range(12):
        ids = torch.tensor([[i + 1, 7, 8, 9, 10]])
        outs.append(model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=257, eos_token_id=319))
        s.flush()
    errors = s.stats()["errors"]
print("generated", len(outs))
print("errors", len([e for e in errors if "sink" in e]))
"""


def test_disk_full(tiny_dirs, load, tmp_path):
    # The limit leaves the sink room for the first requests (their file is ~150 KB) plus its
    # reserve (2 chunks + 1 MiB to close), not for the whole run (~260 KB).
    out = tmp_path / "full.h5"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(tiny_dirs["qwen3"]), str(out), str(1_700_000)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generated 12" in r.stdout  # inference unharmed
    assert "errors 0" not in r.stdout  # the failure was reported
    run = dmi.open(out)
    assert not run.complete
    model = load("qwen3")
    hook = "blocks.1.hook_resid_post"
    checked = 0
    for rid in run.requests:
        pos = run.positions(hook, rid)
        if len(pos) == 12:  # a request committed whole before the disk filled up
            i = int(rid)
            logits = run.get("hook_logits", rid)
            seq = [i + 1, 7, 8, 9, 10] + logits[:7].argmax(-1).tolist()
            assert (run.get(hook, rid) - reference(model, seq)[hook]).abs().max() < 1e-4
            checked += 1
    assert checked >= 1
