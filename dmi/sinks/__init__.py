"""Sinks persist row blocks on their own thread. HDF5 is built in; others come as plugins."""
from .base import GapBlock, HookInfo, RowBlock, RunMeta, Sink

__all__ = ["Sink", "RowBlock", "GapBlock", "HookInfo", "RunMeta"]
