"""The dmi::capture op and its CPU registration; see the package docstring."""
from __future__ import annotations

import torch

from dmi.kernels.cpu import capture_rows as cpu_rows

# ctrl is int64 [n_hooks, CTRL_WIDTH], one row per capture point, written by the step's plan
# before the forward (dmi/plan): whether the hook is written this step, the ring byte offset of
# its first row, how many rows, which row group of `rows` names their source rows, how many
# rows and bytes per row the tensor must have (a tensor that disagrees writes nothing), and
# where in the ring the op reports how many rows it wrote (the frame's status word, read by the
# drain: a planned hook whose capture point never ran is recorded, never committed as garbage).
# Under CUDA graphs ctrl and rows are device tensors the plan rewrites before each replay; the
# graph itself never changes.
CTRL_ENABLED = 0
CTRL_OFFSET = 1
CTRL_COUNT = 2
CTRL_GROUP = 3
CTRL_XROWS = 4
CTRL_ROW_BYTES = 5
CTRL_STATUS = 6
CTRL_WIDTH = 7

# Defined through torch.library's schema API rather than the @custom_op decorator: same
# opaque op, same mutation annotation (`Tensor(a!) ring`), same fake impl for torch.compile,
# but the decorator's Python autograd/ADInplaceOrView wrappers cost ~15 us a call, ~3x the
# copy itself for a decode step's rows (measured on CPU; see docs/decisions.md).
_lib = torch.library.Library("dmi", "DEF")
_lib.define("capture(Tensor(a!) ring, Tensor x, Tensor rows, Tensor ctrl, int slot) -> ()")


def _capture_impl(ring: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, ctrl: torch.Tensor, slot: int) -> None:
    """Copy the planned rows of `x` (viewed as [rows, ...]) into `ring` where ctrl[slot] says.

    ring: uint8 [ring_bytes]; x: [rows, *row_shape] any dtype; rows: int64 [groups, capacity],
    source rows per row group; ctrl: int64 [n_hooks, CTRL_WIDTH]. A disabled slot, or an x whose
    row count or row bytes differ from the plan's, writes nothing (its status stays 0).
    """
    if ring.device.type == "cuda":
        from dmi.kernels.triton_capture import capture_rows as triton_rows

        return triton_rows(ring, x, rows, ctrl, slot)
    cpu_rows(ring, x, rows, ctrl, slot)


# CompositeExplicitAutograd: one kernel for every device and no autograd (captures are
# side effects on a buffer that never requires grad).
_lib.impl("capture", _capture_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("dmi::capture")
def _capture_fake(ring, x, rows, ctrl, slot) -> None:
    return None


capture = torch.ops.dmi.capture.default


def eager(ring: torch.Tensor, control):
    """The capture op's kernel for eager forwards, as a callable (x, slot, lead=1): the same
    kernel as the op's, without the dispatcher (an eager forward has no graph to keep the op
    in). x's first `lead` dims are its rows ([batch, tokens, ...]: lead=2)."""
    if ring.device.type == "cuda":
        from dmi.kernels.triton_capture import capture_rows as triton_rows

        return lambda x, slot, lead=1: triton_rows(ring, x.flatten(0, lead - 1) if lead > 1 else x, control.rows,
                                                   control.ctrl, slot)
    from dmi.kernels.cpu import EagerCPU

    return EagerCPU(ring, control)


def capture_reference(ring: torch.Tensor, x: torch.Tensor, src_rows: torch.Tensor, offset: int) -> None:
    """Plain-Python statement of what the op does with one hook's rows, for tests of other
    implementations."""
    data = x.reshape(x.shape[0], -1)[src_rows].contiguous().view(torch.uint8).reshape(-1)
    ring[offset: offset + data.numel()] = data


def plan_row(offset: int, count: int, group: int, xrows: int, row_bytes: int, status: int) -> list[int]:
    """One ctrl row, in column order (tests and adapters that plan by hand)."""
    return [1, offset, count, group, xrows, row_bytes, status]
