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


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 9), width=st.integers(1, 40), offset=st.integers(0, 300), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]),
       transpose=st.booleans(), wrong=st.sampled_from([None, "rows", "bytes", "disabled"]))
def test_eager_kernel_writes_what_the_op_writes(n, width, offset, seed, dtype, transpose, wrong):
    """Eager forwards call the kernel without the dispatcher (numpy on the CPU); for any plan,
    alignment, dtype (bf16 has no numpy type) and non-contiguous input it writes exactly the
    bytes the op writes, and nothing where the op writes nothing."""
    from dmi.kernels.capture_op import eager
    from dmi.plan.control import ControlTable

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(width, n, generator=g).t() if transpose else torch.randn(n, width, generator=g)
    x = x.to(dtype) if dtype != torch.int64 else (x * 100).to(torch.int64)
    keep = torch.randperm(n, generator=g)[: max(1, n // 2)].sort().values
    row_bytes = width * x.element_size()
    rings, status = [], 1024
    for use_eager in (False, True):
        ring = torch.zeros(4096, dtype=torch.uint8)
        c = ControlTable(1, 1, torch.device("cpu"))
        c.rows_np[0, : len(keep)] = keep.numpy()
        c.ctrl_np[0] = plan_row(offset, len(keep), 0, n + (wrong == "rows"), row_bytes + (wrong == "bytes"), status)
        if wrong == "disabled":
            c.ctrl_np[0] = 0
        if use_eager:
            eager(ring, c)(x, 0)
        else:
            capture(ring, x, c.rows, c.ctrl, 0)
        rings.append(ring)
    assert torch.equal(rings[0], rings[1])
    if wrong is None:
        assert int(rings[1][status: status + 8].view(torch.int64)) == len(keep)
    else:
        assert not rings[1].any()
