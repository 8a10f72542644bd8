"""The capture op's CUDA kernel, in Triton.

One program copies one block of one kept row: row r of the slot goes to
ring[offset + r * row_bytes : ...]. What changes from step to step can come from a device
tensor instead of kernel arguments (`ctrl[slot] = enabled, offset, count`), so a CUDA graph
that recorded this kernel once writes each replayed step to the place the host planned for
it, and a frame the host dropped (enabled = 0) writes nothing. Eager calls pass the same
three values as scalars and skip the device read.

The kernel moves words of the widest size (4, 2 or 1 bytes) that the row size, the row
stride and the base addresses allow: the copy is bandwidth-bound and byte loads waste it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .capture_op import CTRL_COUNT, CTRL_ENABLED, CTRL_OFFSET, CTRL_WIDTH

BLOCK = 1024  # words per program

_kernel = None  # jitted on first use, so a TRITON_INTERPRET=1 set by a test before that is honoured


def _body(ring_ptr, x_ptr, rows_ptr, ctrl_ptr, slot, offset_arg, count_arg, row_words, x_stride, x_rows,
          FROM_CTRL: tl.constexpr, WORD: tl.constexpr, CTRL_W: tl.constexpr, C_EN: tl.constexpr,
          C_OFF: tl.constexpr, C_CNT: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cb = tl.program_id(1)
    if FROM_CTRL:
        enabled = tl.load(ctrl_ptr + slot * CTRL_W + C_EN)
        offset = tl.load(ctrl_ptr + slot * CTRL_W + C_OFF)
        count = tl.load(ctrl_ptr + slot * CTRL_W + C_CNT)
        live = (enabled != 0) & (r < count)
    else:
        offset = offset_arg
        live = r < count_arg
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    # Masked, not branched: a disabled slot or a row past `count` loads and stores nothing.
    src = tl.load(rows_ptr + r).to(tl.int64)  # in bounds: the grid never exceeds src_rows
    # A plan made for another shape (graphplan records those rows as gaps) must not read
    # outside x: such rows write nothing.
    mask = (cols < row_words) & live & (src < x_rows)
    v = tl.load(x_ptr + src * x_stride + cols, mask=mask)
    dst = (offset // WORD) + r.to(tl.int64) * row_words
    tl.store(ring_ptr + dst + cols, v, mask=mask)

def kernel():
    global _kernel
    if _kernel is None:
        _kernel = triton.jit(_body)
    return _kernel


_WORDS = ((4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _word(row_bytes: int, stride_bytes: int, x_ptr: int, ring_ptr: int, offset: int) -> tuple[int, torch.dtype]:
    for size, dtype in _WORDS:
        if not (row_bytes | stride_bytes | x_ptr | ring_ptr | offset) % size:
            return size, dtype
    return _WORDS[-1]


def capture_rows(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, ctrl: torch.Tensor, slot: int,
                 from_ctrl: bool | None = None) -> None:
    """dmi::capture on a GPU (or under TRITON_INTERPRET=1 on CPU).

    ctrl on the host: an eager call; enabled/offset/count are read here and passed as scalars.
    ctrl on the device: a graph-safe call; the kernel reads them, src_rows is a fixed-size
    buffer of which the first `count` entries are used.
    """
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    if rows.shape[1] and rows.stride(1) != 1:
        rows = rows.contiguous()
    row_bytes = rows.shape[1] * rows.element_size()
    stride_bytes = rows.stride(0) * rows.element_size()
    if from_ctrl is None:
        from_ctrl = ctrl.device.type != "cpu"
    if from_ctrl:
        offset = count = 0
        grid_rows = src_rows.numel()
    else:
        enabled, offset, count = (int(v) for v in ctrl[slot, :3].tolist())
        if not enabled or count == 0 or row_bytes == 0:
            return
        grid_rows = min(count, src_rows.numel())
    if grid_rows == 0 or row_bytes == 0:
        return
    # Device-planned offsets are ALIGN (64) multiples (PayloadRing), so any word size fits them.
    size, wdtype = _word(row_bytes, stride_bytes, rows.data_ptr(), ring.data_ptr(), offset)
    xw = _as_words(rows, wdtype)
    rw = ring[: ring.numel() // size * size].view(wdtype)
    row_words = row_bytes // size
    grid = (grid_rows, triton.cdiv(row_words, BLOCK))
    kernel()[grid](rw, xw, src_rows, ctrl, slot, offset, count, row_words, stride_bytes // size, rows.shape[0],
                   FROM_CTRL=from_ctrl, WORD=size, CTRL_W=CTRL_WIDTH, C_EN=CTRL_ENABLED, C_OFF=CTRL_OFFSET,
                   C_CNT=CTRL_COUNT, BLOCK=BLOCK)


def _as_words(rows: torch.Tensor, wdtype: torch.dtype) -> torch.Tensor:
    """The rows' storage as words, keeping the row stride (a view, no copy)."""
    b = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
    return b.view(wdtype) if wdtype != torch.uint8 else b

