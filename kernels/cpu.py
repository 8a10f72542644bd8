"""The capture op's implementation in plain torch: correct on any device, the CPU path."""
from __future__ import annotations

import torch


def capture_rows(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, ctrl: torch.Tensor, slot: int) -> None:
    enabled, offset, count = ctrl[slot, :3].tolist()
    if not enabled or count <= 0 or src_rows.numel() == 0:
        return
    src_rows = src_rows[:count].to(x.device)
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    n, width, size = len(src_rows), rows.shape[1], rows.element_size()
    # Either way the rows are copied: the ring never keeps a view of an engine buffer that an
    # in-place kernel could overwrite later.
    try:
        if offset % size == 0:
            # Session slots are 64-byte aligned: gather straight into the slot, one copy.
            out = ring[offset: offset + n * width * size].view(rows.dtype).view(n, width)
            torch.index_select(rows, 0, src_rows, out=out)
        else:
            data = rows.index_select(0, src_rows).view(torch.uint8).reshape(-1)
            ring[offset: offset + data.numel()].copy_(data)
    except IndexError:
        # A device plan made for another shape: graphplan records those rows as gaps, so what
        # the slot holds is never read.
        return
