"""The dmi::capture op and its CPU registration; see the package docstring."""
from __future__ import annotations

import torch

from dmi.kernels.cpu import capture_rows as cpu_rows

# ctrl is int64 [n_slots, CTRL_WIDTH]: per capture slot, an enabled flag, the byte offset in
# the ring where the slot's first row goes, and how many entries of src_rows are used. Rows
# are written back to back. On a GPU under CUDA graphs ctrl and src_rows are device tensors
# the host rewrites before each replay; the graph itself never changes.
CTRL_ENABLED = 0
CTRL_OFFSET = 1
CTRL_COUNT = 2
CTRL_WIDTH = 3

# Defined through torch.library's schema API rather than the @custom_op decorator: same
# opaque op, same mutation annotation (`Tensor(a!) ring`), same fake impl for torch.compile,
# but the decorator's Python autograd/ADInplaceOrView wrappers cost ~15 us a call, ~3x the
# copy itself for a decode step's rows (measured on CPU; see docs/decisions.md).
_lib = torch.library.Library("dmi", "DEF")
_lib.define("capture(Tensor(a!) ring, Tensor x, Tensor src_rows, Tensor ctrl, int slot) -> ()")


def _capture_impl(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, ctrl: torch.Tensor,
                  slot: int) -> None:
    """Copy rows `src_rows` of `x` (viewed as [rows, ...]) into `ring` at ctrl[slot]'s offset.

    ring: uint8 [ring_bytes]; x: [rows, *row_shape] any dtype; src_rows: int64 [>= count];
    ctrl: int64 [n_slots, CTRL_WIDTH]. A disabled slot writes nothing (a dropped frame).
    """
    if ring.device.type == "cuda":
        from dmi.kernels.triton_capture import capture_rows as triton_rows

        return triton_rows(ring, x, src_rows, ctrl, slot)
    cpu_rows(ring, x, src_rows, ctrl, slot)


# CompositeExplicitAutograd: one kernel for every device and no autograd (captures are
# side effects on a buffer that never requires grad). A CUDA-specific kernel registered
# later for the CUDA key takes precedence there.
_lib.impl("capture", _capture_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("dmi::capture")
def _capture_fake(ring, x, src_rows, ctrl, slot) -> None:
    return None


capture = torch.ops.dmi.capture.default


def capture_reference(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, offset: int) -> None:
    """Plain-Python statement of what the op does, for tests of other implementations."""
    data = x.reshape(x.shape[0], -1)[src_rows].contiguous().view(torch.uint8).reshape(-1)
    ring[offset: offset + data.numel()] = data
