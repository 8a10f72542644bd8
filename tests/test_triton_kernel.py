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
from dmi.kernels.capture_op import CTRL_WIDTH, capture_reference, plan_row  # noqa: E402
from dmi.kernels.cpu import capture_rows as cpu_capture_rows  # noqa: E402


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


def _plan(n_hooks: int, slot: int, off: int, src: list[int], x_rows: int, row_bytes: int, status: int,
          cap: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A plan with one enabled hook, group 1 (group 0 holds junk a kernel must not read)."""
    ctrl = torch.zeros(n_hooks, CTRL_WIDTH, dtype=torch.int64)
    ctrl[slot] = torch.tensor(plan_row(off, len(src), 1, x_rows, row_bytes, status))
    rows = torch.full((2, cap), x_rows - 1, dtype=torch.int64)
    rows[1, : len(src)] = torch.tensor(src, dtype=torch.int64)
    return ctrl.to(DEV), rows.to(DEV)


IMPLS = {"triton": triton_capture.capture_rows, "cpu": cpu_capture_rows}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 7), width=st.integers(1, 700), dtype=st.sampled_from(DTYPES), strided=st.booleans(),
       data=st.data())
def test_plan_driven_call_copies_exactly_the_kept_rows_and_reports_them(impl, rows, width, dtype, strided, data):
    x = _data(rows, width, dtype, strided)
    keep = data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows, unique=True))
    off = 64 * data.draw(st.integers(1, 3))
    row_bytes = width * x.element_size()
    ring = torch.full((off + len(keep) * row_bytes + 100,), 7, dtype=torch.uint8)
    ring[:64] = 0  # the status header
    expected = ring.clone()
    capture_reference(expected, x, torch.tensor(keep), off)
    expected[8:16] = torch.tensor([len(keep)], dtype=torch.int64).view(torch.uint8)
    ctrl, plan_rows = _plan(2, 1, off, keep, rows, row_bytes, status=8)
    ring = ring.to(DEV)
    IMPLS[impl](ring, x.to(DEV), plan_rows, ctrl if impl == "triton" else ctrl.cpu(), 1)
    assert torch.equal(ring.cpu(), expected)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_disabled_or_mismatched_tensor_writes_nothing(impl):
    """A hook the plan disabled (a dropped frame), or a tensor of another row count or row size
    than planned (a graph break, a plan made for another shape), writes nothing, status included."""
    x = torch.randn(4, 6)
    for rows_seen, width, enabled in ((4, 6, 0), (5, 6, 1), (4, 7, 1)):
        ring = torch.full((512,), 9, dtype=torch.uint8, device=DEV)
        ctrl, plan_rows = _plan(1, 0, 64, [0, 2], rows_seen, width * 4, status=0)
        ctrl[0, 0] = enabled
        IMPLS[impl](ring, x.to(DEV), plan_rows, ctrl, 0)
        assert (ring.cpu() == 9).all(), (rows_seen, width, enabled)


def test_launcher_refuses_host_tensors_for_a_device_ring():
    """Triton's launcher cannot read host pointers: every plan tensor must be on the ring's device."""
    ring = torch.zeros(256, dtype=torch.uint8, device="meta")
    x = torch.zeros(2, 4, device="meta")
    ctrl, plan_rows = _plan(1, 0, 64, [0], 2, 16, 0)
    with pytest.raises(ValueError, match="ctrl is on cpu"):
        triton_capture.check_devices(ring, x, plan_rows.to("meta"), ctrl.cpu())


def test_word_size_follows_alignment():
    # 4-byte words need row size, stride and both base addresses to be multiples of 4 (ring
    # offsets are 64-byte aligned by the plan).
    assert triton_capture._word(12, 16, 64, 128)[0] == 4
    assert triton_capture._word(6, 8, 64, 128)[0] == 2
    assert triton_capture._word(12, 16, 66, 128)[0] == 2
    assert triton_capture._word(3, 3, 64, 128)[0] == 1
