"""Ring²: the payload ring (one preallocated byte buffer on the model's device) and the
frame ring (host-side FIFO of sealed frames, in the order their payload was written)."""
from .frames import FrameRing, Marker
from .payload import PayloadRing

__all__ = ["PayloadRing", "FrameRing", "Marker"]
