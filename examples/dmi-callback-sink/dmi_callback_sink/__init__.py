"""Example dmi sink plugin: stream captured rows to a callback."""
from .sink import CallbackSink, Rows

__all__ = ["CallbackSink", "Rows"]
