"""Ring²: the payload ring (one preallocated byte buffer on the model's device) and the
frame ring (host-side descriptors of what was written where, in order)."""
from .frames import FrameRing, Slot, StepPlan
from .payload import PayloadRing

__all__ = ["PayloadRing", "FrameRing", "Slot", "StepPlan"]
