"""When the drain takes sealed frames (dmi/ring/frames.py): at a pause of the engine, or after
max_delay, or at once for a marker, on a CPU engine; every period when streaming; and what a
session on the CPU chooses. The clock is real, the margins wide: these check the schedule's
behaviour, not its speed."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import dmi
from dmi.ring.frames import FrameRing, Marker


class Step(int):
    """A sealed step of `nbytes` ring bytes (what the stream schedule counts)."""

    def __new__(cls, k: int, nbytes: int = 0):
        obj = super().__new__(cls, k)
        obj.nbytes = nbytes
        return obj


class Producer:
    """Puts an item every `every` seconds for `seconds`, from its own thread, like an engine's steps."""

    def __init__(self, ring: FrameRing, every: float, seconds: float, nbytes: int = 0):
        self.ring, self.every, self.seconds, self.nbytes = ring, every, seconds, nbytes
        self.started = self.stopped = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.started = time.monotonic()
        k = 0
        while time.monotonic() - self.started < self.seconds:
            self.ring.put(Step(k, self.nbytes))
            k += 1
            time.sleep(self.every)
        self.stopped = time.monotonic()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join()


def _takes(ring: FrameRing, until: float) -> list[tuple[float, list]]:
    out = []
    while time.monotonic() < until:
        items = ring.take_all(timeout=0.05)
        if items:
            out.append((time.monotonic(), items))
    return out


def test_pause_schedule_waits_for_the_engine_to_pause():
    ring = FrameRing(pause=True, max_delay=30.0)
    with Producer(ring, every=0.01, seconds=1.0) as p:
        takes = _takes(ring, time.monotonic() + 1.6)
    items = [i for _, batch in takes for i in batch]
    assert items == list(range(len(items))) and len(items) > 20
    # nothing moved while the steps kept coming; all of it once they stopped
    assert all(t >= p.stopped for t, _ in takes), [round(t - p.stopped, 3) for t, _ in takes]
    assert len(takes) == 1
    assert takes[0][0] - p.stopped < 0.5


def test_pause_schedule_bounds_the_delay_while_the_engine_never_pauses():
    ring = FrameRing(pause=True, max_delay=0.3)
    with Producer(ring, every=0.01, seconds=1.5) as p:
        takes = _takes(ring, time.monotonic() + 2.0)
    assert [i for _, b in takes for i in b] == list(range(sum(len(b) for _, b in takes)))
    during = [t for t, _ in takes if t < p.stopped]
    assert 2 <= len(during) <= 6, len(during)  # about every max_delay, not every step
    gaps = np.diff([p.started, *during])
    assert (gaps >= 0.25).all(), gaps


def test_a_marker_is_taken_at_once_under_either_schedule():
    for pause in (True, False):
        ring = FrameRing(pause=pause, max_delay=1.0, period=1.0)
        takes: list = []
        stop = time.monotonic() + 1.5
        consumer = threading.Thread(target=lambda: takes.extend(_takes(ring, stop)), daemon=True)
        consumer.start()
        for k in range(30):  # steps keep coming: neither schedule would move them yet
            ring.put(k)
            time.sleep(0.01)
        t0 = time.monotonic()
        ring.put(Marker("flush"), urgent=True)
        for k in range(30, 40):
            ring.put(k)
            time.sleep(0.01)
        consumer.join()
        first_t, first = takes[0]
        assert first_t - t0 < 0.5, (pause, first_t - t0)
        assert first[:30] == list(range(30)) and isinstance(first[30], Marker), (pause, first)


def test_stream_schedule_moves_frames_while_the_engine_runs():
    ring = FrameRing(pause=False, period=0.1, batch_bytes=1 << 20)
    with Producer(ring, every=0.01, seconds=1.0, nbytes=256 << 10) as p:  # a batch's worth every 0.04 s
        takes = _takes(ring, time.monotonic() + 1.3)
    during = [t for t, _ in takes if t < p.stopped]
    assert 5 <= len(during) <= 12, len(during)  # every period, not every batch's worth of bytes


def test_stream_schedule_lets_a_trickle_of_small_steps_make_a_batch():
    """Steps of a few KiB (batch 1) wait past the period until batch_bytes or max_period, so a
    take's fixed costs are paid for many steps; a step that completes the batch ends the wait."""
    ring = FrameRing(pause=False, period=0.1, batch_bytes=1 << 20, max_period=0.5)
    with Producer(ring, every=0.01, seconds=1.6, nbytes=4 << 10) as p:  # ~0.4 MiB a second
        takes = _takes(ring, time.monotonic() + 2.0)
    items = [i for _, b in takes for i in b]
    assert items == list(range(len(items)))
    during = [t for t, _ in takes if t < p.stopped]
    assert 2 <= len(during) <= 4, len(during)  # about every max_period, not every period
    assert (np.diff([p.started, *during]) >= 0.4).all()
    ring = FrameRing(pause=False, period=0.1, batch_bytes=1 << 20, max_period=5.0)
    with Producer(ring, every=0.01, seconds=1.0, nbytes=64 << 10) as p:  # a batch every ~0.16 s
        takes = _takes(ring, time.monotonic() + 1.2)
    during = [(t, b) for t, b in takes if t < p.stopped]
    assert 3 <= len(during) <= 8, len(during)
    assert all(sum(i.nbytes for i in b) >= 1 << 20 for _, b in during[:-1])


@pytest.mark.parametrize("drain, pause", [({}, False), ({"schedule": "stream"}, False),
                                         ({"schedule": "pause", "max_delay_s": 1.5}, True)])
def test_a_session_takes_the_schedule_asked(load, tmp_path, drain, pause):
    model = load("qwen3")
    spec = dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(tmp_path / "r.h5"), drain=drain)
    with dmi.attach(model, spec) as s:
        assert s.frames.pause is pause and s.frames.max_delay == drain.get("max_delay_s", 5.0)
        assert s.frames.max_period == 1.0


def test_a_stream_batch_waits_no_longer_than_the_sinks_commit_interval(load, tmp_path):
    model = load("qwen3")
    spec = dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"],
                           sink={"kind": "hdf5", "path": str(tmp_path / "r.h5"), "flush_every_s": 0.2})
    with dmi.attach(model, spec) as s:
        assert s.frames.max_period == 0.2


def test_rows_of_a_generate_reach_a_live_reader_once_the_engine_pauses(load, tmp_path):
    """No flush, no close: the pause after generate lets the drain move the rows, and the sink's
    timed commit makes them visible to a reader of the live file."""
    import torch

    model = load("qwen3")
    out = str(tmp_path / "live.h5")
    spec = dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post"], sink={"kind": "hdf5", "path": out,
                                                                      "flush_every_s": 0.2},
                           drain={"schedule": "pause"})
    with dmi.attach(model, spec) as s:
        assert s.frames.pause
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=257, eos_token_id=319)
        produced = s.stats()["rows"]["produced"]
        end = time.monotonic() + 15
        while s.stats()["rows"]["committed"] < produced and time.monotonic() < end:
            time.sleep(0.05)
        assert s.stats()["rows"]["committed"] == produced > 0
        with dmi.open(out) as run:
            assert sum(run.num_rows(h) for h in run.hooks) == produced


def test_a_backlog_drained_in_slices_keeps_every_row(load, tmp_path, monkeypatch):
    """After a pause the drain takes the whole backlog and gathers it a slice at a time (here
    one frame per slice): every slice's blocks reach the sink in order, and the rows equal the
    unpadded single-sequence forward."""
    import dmi.drain.worker as worker
    from helpers import assert_books_balance, assert_matches, fed_sequences, left_pad

    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_logits"]
    slices = []
    orig = worker.Drain._drain_slice

    def drain_slice(self, frames, batch):
        slices.append(len(frames))
        return orig(self, frames, batch)

    monkeypatch.setattr(worker, "_GATHER_BYTES", 1)
    monkeypatch.setattr(worker.Drain, "_drain_slice", drain_slice)
    model = load("qwen3")
    ids, mask = left_pad(prompts, 257)
    path = str(tmp_path / "sliced.h5")
    with dmi.attach(model, dmi.CaptureSpec(hooks=hooks, sink=path, drain={"schedule": "pause"})) as s:
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=257, eos_token_id=319)
        s.flush()
    assert max(slices) == 1 and sum(slices) == 8  # one frame a slice, every step's frame drained
    run = dmi.open(path)
    assert_books_balance(run.stats)
    assert run.stats["rows"]["dropped"] == 0
    for rid, seq in enumerate(fed_sequences(gen, prompts)):
        assert_matches(run, model, str(rid), seq, hooks, logits_from=len(prompts[rid]) - 1)
