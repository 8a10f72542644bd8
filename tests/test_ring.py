"""The payload ring allocator and the capture op, without a model."""
from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmi.kernels.capture_op import capture, capture_reference
from dmi.ring import PayloadRing
from dmi.ring.payload import ALIGN


@settings(max_examples=200, deadline=None)
@given(cap_units=st.integers(1, 64), sizes=st.lists(st.integers(1, 20 * ALIGN), min_size=1, max_size=200),
       seed=st.integers(0, 2**16))
def test_fifo_ring_never_overlaps_and_wraps(cap_units, sizes, seed):
    ring = PayloadRing(cap_units * ALIGN)
    rng = random.Random(seed)
    live: list[tuple[int, int]] = []
    for n in sizes:
        off = ring.alloc(n, wait=False)
        if off is None:
            assert PayloadRing.aligned(n) > ring.capacity or live  # only refused when full or oversize
            # drain some, oldest first, then the ring must take it unless it's oversize
            while live and off is None:
                ring.release(live.pop(0)[0])
                off = ring.alloc(n, wait=False)
            if off is None:
                assert PayloadRing.aligned(n) > ring.capacity
                continue
        end = off + PayloadRing.aligned(n)
        assert 0 <= off and end <= ring.capacity and off % ALIGN == 0
        for s, e in live:
            assert end <= s or off >= e, "overlapping slots"
        live.append((off, end))
        assert ring.used <= ring.capacity
        while live and rng.random() < 0.4:
            ring.release(live.pop(0)[0])
    while live:
        ring.release(live.pop(0)[0])
    assert ring.used == 0 and ring.fill() == 0.0


def test_release_out_of_order_is_a_bug():
    ring = PayloadRing(8 * ALIGN)
    a = ring.alloc(ALIGN, wait=False)
    ring.alloc(ALIGN, wait=False)
    ring.release(a)
    try:
        ring.release(a)
    except RuntimeError:
        return
    raise AssertionError("out-of-order release not caught")


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 9), width=st.integers(1, 17), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
       data=st.data())
def test_capture_op_matches_reference_and_disabled_writes_nothing(rows, width, dtype, data):
    x = (torch.randn(rows, width) * 100).to(dtype)
    keep = sorted(data.draw(st.sets(st.integers(0, rows - 1), min_size=1)))
    src = torch.tensor(keep, dtype=torch.int64)
    nbytes = len(keep) * width * x.element_size()
    off = data.draw(st.integers(0, 64))
    ring = torch.full((nbytes + 128,), 7, dtype=torch.uint8)
    expected = ring.clone()
    capture_reference(expected, x, src, off)
    ctrl = torch.tensor([[0, 0, len(src)], [1, off, len(src)]], dtype=torch.int64)
    capture(ring, x, src, ctrl, 1)
    assert torch.equal(ring, expected)
    untouched = torch.full_like(ring, 7)
    capture(untouched, x, src, ctrl, 0)  # slot 0 disabled: a dropped frame writes nothing
    assert (untouched == 7).all()


def test_capture_op_survives_compile_fullgraph():
    ring = torch.zeros(4096, dtype=torch.uint8)
    ctrl = torch.tensor([[1, 128, 2]], dtype=torch.int64)
    src = torch.tensor([0, 2])

    def f(x):
        y = x * 2
        capture(ring, y, src, ctrl, 0)
        return y + 1

    x = torch.randn(3, 4)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    compiled(x)
    assert torch.equal(ring[128:160].view(torch.float32).reshape(2, 4), (x * 2)[[0, 2]])
    ctrl[0, 1] = 512  # the host moves the frame; the compiled graph follows without retracing
    x2 = torch.randn(3, 4)
    compiled(x2)
    assert torch.equal(ring[512:544].view(torch.float32).reshape(2, 4), (x2 * 2)[[0, 2]])


def test_drain_coalesces_adjacent_slots_into_one_copy_per_range():
    from types import SimpleNamespace

    from dmi.drain.copy import coalesce

    s = lambda off, n: SimpleNamespace(offset=off, nbytes=n)  # noqa: E731
    # 0..64 and 64..192 are back to back (sizes round up to 64); 512 starts a new range (the
    # ring skipped its end and wrapped, or a slot in between was released already)
    assert coalesce([s(0, 10), s(64, 100), s(512, 64), s(576, 1)]) == [(0, 192), (512, 640)]
    assert coalesce([]) == []


def test_select_rows_equals_select_for_the_same_rows():
    """A tensor addressed row by row (one logits row per request) is planned exactly as the same
    rows addressed as "the last token of each batch row"."""
    import numpy as np

    from dmi.ring.frames import DECODE, RowTable, StepPlan

    B, T = 3, 4
    request = np.array([0, 0, 0, 0, -1, -1, 1, 1, 2, 2, 2, 2], dtype=np.int32)
    rows = RowTable(B, T, ["a", "b", "c"], request, np.arange(B * T, dtype=np.int64), np.full(B * T, DECODE, np.int8))
    keep = (request >= 0) & (np.arange(B * T) != 11)  # the filters leave out request c's last row
    reduced = keep & (request == 0)
    for red in (None, reduced):
        plan = StepPlan(0, rows, keep, reduced=red)
        for fb in (True, False):
            a, b = plan.select(1, fb), plan.select_rows(np.array([3, 7, 11, -1]), fb)
            assert torch.equal(a.src_rows, b.src_rows) and np.array_equal(a.token_idx, b.token_idx)
            assert (a.produced, a.filtered) == (b.produced, b.filtered) and np.array_equal(a.lost_idx, b.lost_idx)
