"""dmi-toyengine: a small continuous-batching inference engine and the dmi adapter for it.

A worked example of a third-party dmi adapter: the engine (`Engine`) knows nothing about dmi,
and the adapter reaches it only through forward hooks on its modules and its step listeners.
"""
from .engine import Engine, Request, Segment, StepBatch, ToyConfig

__all__ = ["Engine", "Request", "Segment", "StepBatch", "ToyConfig"]
