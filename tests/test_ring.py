"""The payload ring allocator and the capture op, without a model."""
from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmi.kernels.capture_op import capture, plan_row
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


def test_capture_op_survives_compile_fullgraph():
    """One dmi::capture node in the graph; the host moves the hook's rows through the plan
    (ctrl, rows) between calls and the compiled graph follows without retracing."""
    ring = torch.zeros(4096, dtype=torch.uint8)
    ctrl = torch.tensor([plan_row(128, 2, 0, 3, 16, 0)], dtype=torch.int64)
    rows = torch.tensor([[0, 2, 0]], dtype=torch.int64)

    def f(x):
        y = x * 2
        capture(ring, y, rows, ctrl, 0)
        return y + 1

    x = torch.randn(3, 4)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    compiled(x)
    assert torch.equal(ring[128:160].view(torch.float32).reshape(2, 4), (x * 2)[[0, 2]])
    assert ring[:8].view(torch.int64).item() == 2  # the status word: rows written
    ctrl[0, 1], rows[0, :2] = 512, torch.tensor([1, 0])
    x2 = torch.randn(3, 4)
    compiled(x2)
    assert torch.equal(ring[512:544].view(torch.float32).reshape(2, 4), (x2 * 2)[[1, 0]])


def test_drain_coalesces_adjacent_slots_into_one_copy_per_range():
    from dmi.drain.copy import coalesce

    # 0..64 and 64..192 are back to back (sizes round up to 64); 512 starts a new range (the
    # ring skipped its end and wrapped, or a frame in between was released already)
    assert coalesce([(0, 10), (64, 100), (512, 64), (576, 1)]) == [(0, 192), (512, 640)]
    assert coalesce([]) == []


def test_row_table_take_addresses_rows_per_request():
    """A tensor addressed row by row (one logits row per request, -1 a padding row) gets the
    request, position and batch row of the token rows it points at."""
    import numpy as np

    from dmi.plan.rows import DECODE, RowTable

    B, T = 3, 4
    request = np.array([0, 0, 0, 0, -1, -1, 1, 1, 2, 2, 2, 2], dtype=np.int32)
    rows = RowTable(B, T, ["a", "b", "c"], request, np.arange(B * T, dtype=np.int64), np.full(B * T, DECODE, np.int8))
    t = rows.take([3, 7, 11, -1])
    assert t.request.tolist() == [0, 1, 2, -1] and t.position.tolist()[:3] == [3, 7, 11]
    assert t.batch_of(np.arange(3)).tolist() == [0, 1, 2] and t.n_rows == 4
