"""The capture op's implementation in plain torch: correct on any device, the CPU path."""
from __future__ import annotations

import torch


def capture_rows(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, ctrl: torch.Tensor, slot: int) -> None:
    enabled, offset, count = (int(v) for v in ctrl[slot, :3].tolist())
    if not enabled or count <= 0 or src_rows.numel() == 0:
        return
    src_rows = src_rows[:count]
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    # index_select always copies: the ring never keeps a view of an engine buffer that
    # an in-place kernel could overwrite later.
    try:
        data = rows.index_select(0, src_rows.to(rows.device)).contiguous().view(torch.uint8).reshape(-1)
    except (IndexError, RuntimeError):
        # A device plan made for another shape (graphplan records those rows as gaps): write nothing.
        return
    ring[offset: offset + data.numel()].copy_(data)
