"""A sink slower than the engine: `block` loses nothing, `drop` loses whole slots and records each."""
from __future__ import annotations

import time

import pytest
import torch

import dmi
from dmi.plugins import hookimpl, manager
from dmi.sinks.hdf5 import HDF5Sink
from helpers import assert_books_balance, assert_matches, fed_sequences, left_pad

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
PAD, NO_EOS = 257, 319


class SlowSink(HDF5Sink):
    def __init__(self, path, delay):
        super().__init__(path)
        self.delay = delay

    def write(self, block):
        time.sleep(self.delay)
        super().write(block)


class SlowSinkPlugin:
    @hookimpl
    def dmi_sink_for(self, sink_spec):
        if isinstance(sink_spec, dict) and sink_spec.get("kind") == "slow":
            return SlowSink(sink_spec["path"], sink_spec["delay"])
        return None


@pytest.fixture(scope="module", autouse=True)
def slow_plugin():
    plugin = SlowSinkPlugin()
    manager().register(plugin, name="test-slow-sink")
    yield
    manager().unregister(plugin)


HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]
ROW = 64 * 4  # one resid row of the tiny model


def _run(load, out, overload, ring_bytes):
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    spec = dmi.CaptureSpec(hooks=HOOKS, overload=overload, ring={"bytes": ring_bytes},
                           sink={"kind": "slow", "path": out, "delay": 0.01})
    with dmi.attach(model, spec) as s:
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=PAD, eos_token_id=NO_EOS)
        high = s.stats()["ring"]["high_water_bytes"]
    return model, gen, dmi.open(out), high


def test_block_with_a_tiny_ring_loses_nothing(load, out):
    ring = 4096  # a few slots: a prefill step of resid rows (15 rows x 256 B) alone nearly fills it
    model, gen, run, high = _run(load, out, "block", ring)
    assert high <= ring
    assert run.stats["rows"]["dropped"] == 0 and run.gaps() == []
    assert_books_balance(run.stats)
    for rid, seq in enumerate(fed_sequences(gen, PROMPTS)):
        assert_matches(run, model, str(rid), seq, run.hooks, logits_from=len(PROMPTS[rid]) - 1)


def test_drop_counts_and_records_every_lost_row(load, out):
    model, gen, run, _ = _run(load, out, "drop", 4096)
    stats = run.stats
    assert_books_balance(stats)
    assert stats["rows"]["dropped"] > 0, "a 10 ms/slot sink behind a 4 KiB ring must drop under 'drop'"
    assert stats["drop_reasons"].get("ring_full", 0) == stats["rows"]["dropped"]
    gaps = run.gaps()
    assert len(gaps) == stats["rows"]["dropped"]
    seqs = fed_sequences(gen, PROMPTS)
    for hook in run.hooks:
        for rid, seq in enumerate(seqs):
            rid = str(rid)
            have = set(run.positions(hook, rid).tolist())
            missing = {g["position"] for g in run.gaps(hook=hook, request=rid)}
            assert not have & missing
            want = set(range(len(PROMPTS[int(rid)]) - 1 if hook == "hook_logits" else 0, len(seq)))
            assert have | missing == want, (hook, rid)
    for rid, seq in enumerate(seqs):  # what was written is still exact
        ref_hooks = [h for h in run.hooks if len(run.positions(h, str(rid))) == len(seq)]
        assert_matches(run, model, str(rid), seq, [h for h in ref_hooks if h != "hook_logits"])


def test_oversize_step_is_dropped_and_recorded_not_hung(load, out):
    model = load("qwen3")
    spec = dmi.CaptureSpec(hooks=["hook_logits"], ring={"bytes": 2 * 1280}, sink=out)
    with dmi.attach(model, spec):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]]))  # 4 logits rows = 5120 B > ring
            model(torch.tensor([[5]]))
    run = dmi.open(out)
    assert run.stats["drop_reasons"] == {"oversize": 4}
    assert [g["position"] for g in run.gaps(request="0")] == [0, 1, 2, 3]
    assert run.positions("hook_logits", "1").tolist() == [0]
    assert any("ring.bytes" in e for e in run.stats["errors"])
