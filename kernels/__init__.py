"""Capture ops (import name dmi.kernels): the only code that writes into the payload ring.

`dmi::capture` is a torch.library op that mutates the ring, with a fake impl, so
torch.compile keeps it as one opaque node (never traced through, never reordered away)
and a CUDA graph records it as a kernel. Where a hook's rows go is read from the step's plan
(a small control table the host writes before each forward), so a replayed graph writes each
step to the right place. No other dmi code runs inside a forward.
"""
if __name__ == "kernels":
    # Python run from the repository root sees this folder as a top-level "kernels", which
    # transformers takes for the hub kernels package and imports. Look like an empty
    # namespace package (no __file__, no version) so it concludes that package is absent,
    # and register nothing: the op belongs to dmi.kernels alone.
    __file__ = None
else:
    from .capture_op import CTRL_WIDTH, capture, capture_reference

    __all__ = ["capture", "capture_reference", "CTRL_WIDTH"]
