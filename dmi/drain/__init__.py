"""The drain: moves sealed slots out of the payload ring to host memory and on to the sink,
each on its own thread, so the engine never waits on a copy or a disk."""
from .worker import Drain, commit_interval

__all__ = ["Drain", "commit_interval"]
