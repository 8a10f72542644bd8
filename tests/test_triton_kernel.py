"""The CUDA capture kernel's logic, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1).

The same kernel object runs on the GPU; only the memory it touches differs."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from dmi.kernels import triton_capture  # noqa: E402
from dmi.kernels.capture_op import CTRL_WIDTH, capture_reference  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _interpret():
    if torch.cuda.is_available():
        yield  # the real kernel on the real device
        return
    old, os.environ["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET"), "1"
    saved, triton_capture._kernel = triton_capture._kernel, None  # rebuild under the interpreter
    try:
        yield
    finally:
        triton_capture._kernel = saved
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


def _data(rows: int, width: int, dtype: torch.dtype, strided: bool) -> torch.Tensor:
    base = torch.randn(rows, width + (3 if strided else 0)) * 50
    x = base.to(dtype) if dtype != torch.bool else base > 0
    return x[:, :width] if strided else x


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), width=st.integers(1, 2100), dtype=st.sampled_from(DTYPES), strided=st.booleans(),
       data=st.data())
def test_eager_call_copies_exactly_the_kept_rows(rows, width, dtype, strided, data):
    x = _data(rows, width, dtype, strided)
    keep = data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows, unique=True))
    src = torch.tensor(keep, dtype=torch.int64)
    off = 64 * data.draw(st.integers(0, 3))
    nbytes = len(keep) * width * x.element_size()
    ring = torch.full((off + nbytes + 100,), 7, dtype=torch.uint8)
    expected = ring.clone()
    capture_reference(expected, x, src, off)
    ctrl = torch.tensor([[1, off, len(keep)]], dtype=torch.int64)
    ring = ring.to(DEV)
    triton_capture.capture_rows(ring, x.to(DEV), src.to(DEV), ctrl, 0)
    assert torch.equal(ring.cpu(), expected)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 300), dtype=st.sampled_from(DTYPES), data=st.data())
def test_graph_call_reads_the_plan_from_ctrl(rows, width, dtype, data):
    """Under a CUDA graph the kernel's arguments are frozen: src_rows is a fixed-size buffer and
    enabled/offset/count come from ctrl. Entries past `count` are stale and must be ignored."""
    x = _data(rows, width, dtype, strided=False).to(DEV)
    count = data.draw(st.integers(0, rows))
    live = data.draw(st.lists(st.integers(0, rows - 1), min_size=count, max_size=count))
    stale = [rows - 1] * (rows - count)  # what a previous step left in the buffer
    src = torch.tensor(live + stale, dtype=torch.int64, device=DEV)
    off = 64 * data.draw(st.integers(0, 2))
    ring = torch.full((off + rows * width * x.element_size() + 64,), 7, dtype=torch.uint8, device=DEV)
    expected = ring.clone()
    if count:
        capture_reference(expected, x, src[:count], off)
    ctrl = torch.zeros(2, CTRL_WIDTH, dtype=torch.int64, device=DEV)
    ctrl[1] = torch.tensor([1, off, count])
    triton_capture.capture_rows(ring, x, src, ctrl, 1, from_ctrl=True)
    assert torch.equal(ring.cpu(), expected.cpu())

    dropped = torch.full_like(ring, 9)
    ctrl[1, 0] = 0  # the host dropped this frame: the replayed kernel writes nothing
    triton_capture.capture_rows(dropped, x, src, ctrl, 1, from_ctrl=True)
    assert (dropped == 9).all()


def test_word_size_follows_alignment():
    # 4-byte words need row size, stride, both base addresses and the offset to be multiples of 4.
    assert triton_capture._word(12, 16, 64, 128, 64)[0] == 4
    assert triton_capture._word(6, 8, 64, 128, 64)[0] == 2
    assert triton_capture._word(12, 16, 66, 128, 64)[0] == 2
    assert triton_capture._word(3, 3, 64, 128, 0)[0] == 1
