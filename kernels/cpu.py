"""The capture op's implementation in plain torch: the CPU path (and correct on any device)."""
from __future__ import annotations

import torch


def capture_rows(ring: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, ctrl: torch.Tensor, slot: int) -> None:
    enabled, offset, count, group, xrows, row_bytes, status = ctrl[slot].tolist()
    if not enabled or count <= 0:
        return
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    n, width, size = flat.shape[0], flat.shape[1], flat.element_size()
    if n != xrows or width * size != row_bytes:
        return  # not the tensor the plan was made for: the status word stays 0 and the drain records it
    src = rows[group, :count]
    # The rows are copied, never viewed: an in-place kernel may overwrite an engine buffer later.
    if offset % size == 0:
        # Plans place rows 64-byte aligned: gather straight into the ring, one copy.
        out = ring[offset: offset + count * row_bytes].view(flat.dtype).view(count, width)
        torch.index_select(flat, 0, src, out=out)
    else:
        data = flat.index_select(0, src).view(torch.uint8).reshape(-1)
        ring[offset: offset + data.numel()].copy_(data)
    ring[status: status + 8].view(torch.int64).fill_(count)
