"""The capture op's CUDA kernel, in Triton.

One program copies one block of one source row. Everything that changes from step to step is
read from the plan's device tensors (`ctrl[slot]`: enabled, offset, count, row group, expected
rows and row bytes, status word; `rows[group]`: the source rows), never passed as arguments,
so a CUDA graph that recorded this kernel once writes each replayed step where that step's
plan says, and nothing for a hook the plan disabled. The grid is sized from the tensor's own
row count (a decode step of 16 rows launches 16 row programs, not the plan's capacity).

The kernel moves words of the widest size (4, 2 or 1 bytes) that the row size, the row
stride and the base addresses allow: the copy is bandwidth-bound and byte loads waste it.
Ring offsets are 64-byte aligned by the plan, which the kernel is told (tl.multiple_of), so
its stores can be vectorised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .capture_op import (CTRL_COUNT, CTRL_ENABLED, CTRL_GROUP, CTRL_OFFSET, CTRL_ROW_BYTES, CTRL_STATUS,
                         CTRL_WIDTH, CTRL_XROWS)

BLOCK = 1024  # words per program

_kernel = None  # jitted on first use, so a TRITON_INTERPRET=1 set by a test before that is honoured


def _body(ring_ptr, status_ptr, x_ptr, rows_ptr, ctrl_ptr, slot, row_words, row_bytes, x_stride, x_rows,
          rows_cap, WORD: tl.constexpr, CTRL_W: tl.constexpr, C_EN: tl.constexpr, C_OFF: tl.constexpr,
          C_CNT: tl.constexpr, C_GRP: tl.constexpr, C_XR: tl.constexpr, C_RB: tl.constexpr,
          C_ST: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cb = tl.program_id(1)
    base = ctrl_ptr + slot * CTRL_W
    enabled = tl.load(base + C_EN)
    offset = tl.load(base + C_OFF)
    count = tl.load(base + C_CNT)
    group = tl.load(base + C_GRP)
    fits = (tl.load(base + C_XR) == x_rows) & (tl.load(base + C_RB) == row_bytes)
    live = (enabled != 0) & fits & (r < count)
    # Masked, not branched: a disabled slot, a tensor the plan was not made for, or a row past
    # `count` loads and stores nothing.
    src = tl.load(rows_ptr + group * rows_cap + r, mask=live, other=0).to(tl.int64)
    live = live & (src >= 0) & (src < x_rows)
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    mask = (cols < row_words) & live
    v = tl.load(x_ptr + src * x_stride + cols, mask=mask)
    dst = tl.multiple_of(offset // WORD, 64 // WORD) + r.to(tl.int64) * row_words
    tl.store(ring_ptr + dst + cols, v, mask=mask)
    # One program reports the rows written: the frame's status word, read by the drain.
    first = (r == 0) & (cb == 0) & (enabled != 0) & fits & (count > 0)
    st = tl.load(base + C_ST)
    tl.store(status_ptr + st // 8, count, mask=first)


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = triton.jit(_body)
    return _kernel


_WORDS = ((4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _word(row_bytes: int, stride_bytes: int, x_ptr: int, ring_ptr: int) -> tuple[int, torch.dtype]:
    for size, dtype in _WORDS:
        if not (row_bytes | stride_bytes | x_ptr | ring_ptr) % size:
            return size, dtype
    return _WORDS[-1]


def check_devices(ring: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, ctrl: torch.Tensor) -> None:
    """Triton's launcher refuses host pointers; say which tensor is on the wrong device."""
    for name, t in (("x", x), ("rows", rows), ("ctrl", ctrl)):
        if t.device != ring.device:
            raise ValueError(f"dmi::capture: {name} is on {t.device}, the ring on {ring.device}; the plan's "
                             f"tensors must live where the kernel runs")


def capture_rows(ring: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, ctrl: torch.Tensor, slot: int) -> None:
    """dmi::capture on a GPU (or under TRITON_INTERPRET=1 on CPU): reads its plan from ctrl/rows."""
    check_devices(ring, x, rows, ctrl)
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    if flat.shape[1] and flat.stride(1) != 1:
        flat = flat.contiguous()
    n = flat.shape[0]
    row_bytes = flat.shape[1] * flat.element_size()
    if n == 0 or row_bytes == 0:
        return
    stride_bytes = flat.stride(0) * flat.element_size()
    size, wdtype = _word(row_bytes, stride_bytes, flat.data_ptr(), ring.data_ptr())
    xw = _as_words(flat, wdtype)
    rw = ring[: ring.numel() // size * size].view(wdtype)
    status = ring[: ring.numel() // 8 * 8].view(torch.int64)
    row_words = row_bytes // size
    grid = (n, triton.cdiv(row_words, BLOCK))
    kernel()[grid](rw, status, xw, rows, ctrl, slot, row_words, row_bytes, stride_bytes // size, n, rows.shape[-1],
                   WORD=size, CTRL_W=CTRL_WIDTH, C_EN=CTRL_ENABLED, C_OFF=CTRL_OFFSET, C_CNT=CTRL_COUNT,
                   C_GRP=CTRL_GROUP, C_XR=CTRL_XROWS, C_RB=CTRL_ROW_BYTES, C_ST=CTRL_STATUS, BLOCK=BLOCK)


def _as_words(rows: torch.Tensor, wdtype: torch.dtype) -> torch.Tensor:
    """The rows' storage as words, keeping the row stride (a view, no copy)."""
    b = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
    return b.view(wdtype) if wdtype != torch.uint8 else b
