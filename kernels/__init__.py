"""Capture ops: the only code that writes into the payload ring.

`dmi::capture` is a torch.library op that mutates the ring, with a fake impl, so
torch.compile keeps it as one opaque node (never traced through, never reordered away)
and a CUDA graph records it as a kernel. Where a row goes is read from a small control
tensor the host updates per step, so a replayed graph writes each step to the right place.
"""
from .capture_op import CTRL_ENABLED, CTRL_OFFSET, CTRL_WIDTH, capture, capture_reference

__all__ = ["capture", "capture_reference", "CTRL_ENABLED", "CTRL_OFFSET", "CTRL_WIDTH"]
