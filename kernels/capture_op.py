from __future__ import annotations

import torch

# ctrl is int64 [n_slots, CTRL_WIDTH]: per capture slot, an enabled flag and the byte
# offset in the ring where the slot's first row goes. Rows are written back to back.
CTRL_ENABLED = 0
CTRL_OFFSET = 1
CTRL_WIDTH = 2


@torch.library.custom_op("dmi::capture", mutates_args=("ring",), device_types=None)
def capture(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, ctrl: torch.Tensor, slot: int) -> None:
    """Copy rows `src_rows` of `x` (viewed as [rows, ...]) into `ring` at ctrl[slot]'s offset.

    ring: uint8 [ring_bytes]; x: [rows, *row_shape] any dtype; src_rows: int64 [n];
    ctrl: int64 [n_slots, CTRL_WIDTH]. A disabled slot writes nothing (a dropped frame).
    """
    from .cpu import capture_rows

    capture_rows(ring, x, src_rows, ctrl, slot)


@capture.register_fake
def _capture_fake(ring, x, src_rows, ctrl, slot) -> None:
    return None


def capture_reference(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, offset: int) -> None:
    """Plain-Python statement of what the op does, for tests of other implementations."""
    data = x.reshape(x.shape[0], -1)[src_rows].contiguous().view(torch.uint8).reshape(-1)
    ring[offset: offset + data.numel()] = data
