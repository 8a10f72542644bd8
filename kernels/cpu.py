"""The capture op's implementation in plain torch: the CPU path (and correct on any device)."""
from __future__ import annotations

import numpy as np
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


class EagerCPU:
    """The same kernel for eager CPU forwards, called directly rather than through the
    dispatcher, reading the plan from its numpy views and copying with numpy: an eager decode
    step launches one per hook, and the dispatcher plus torch's per-op overhead cost several
    times the copy of a few rows (docs/decisions.md, "Eager CPU capture"). Compiled forwards
    keep the op node (and its `capture_rows` kernel); both write the same bytes."""

    def __init__(self, ring: torch.Tensor, control) -> None:
        self.ring = ring
        self.ring_np = ring.numpy()
        self.control = control  # read per call: a CPU plan may grow into new arrays

    def __call__(self, x: torch.Tensor, slot: int, lead: int = 1) -> None:
        c = self.control
        enabled, offset, count, group, xrows, row_bytes, status = c.ctrl_np[slot].tolist()
        if not enabled or count <= 0:
            return
        try:
            xn = x.numpy()  # refused for a tensor that requires grad, and for dtypes numpy lacks
        except (TypeError, RuntimeError):  # bfloat16, float8, a forward outside no_grad: torch's kernel
            x = x.detach()
            return capture_rows(self.ring, x.flatten(0, lead - 1) if lead > 1 and x.dim() >= lead else x,
                                c.rows, c.ctrl, slot)
        if lead > 1 and xn.ndim >= lead:  # [batch, tokens, ...] rows, merged here (a numpy view)
            xn = xn.reshape(-1, *xn.shape[lead:])
        n = xn.shape[0] if xn.ndim else 1
        width = xn.size // n if n else 0
        if n != xrows or width * xn.itemsize != row_bytes:
            return
        ring = self.ring_np
        flat = xn.reshape(n, width)
        if offset % xn.itemsize:
            data = flat.take(c.rows_np[group, :count], axis=0)
            ring[offset: offset + data.nbytes] = data.reshape(-1).view(np.uint8)
        else:
            out = ring[offset: offset + count * row_bytes].view(xn.dtype).reshape(count, width)
            np.take(flat, c.rows_np[group, :count], axis=0, out=out, mode="clip")  # 'raise' buffers `out`
        ring[status: status + 8].view(np.int64)[0] = count
