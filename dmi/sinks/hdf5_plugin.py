"""Registers the HDF5 sink for string paths and {"kind": "hdf5", "path": ...}."""
from __future__ import annotations

from dmi.plugins import hookimpl


@hookimpl
def dmi_sink_for(sink_spec):
    if isinstance(sink_spec, str):
        if sink_spec == "memory":  # the memory sink's name; a file called so is "./memory"
            return None
        path = sink_spec
    elif isinstance(sink_spec, dict) and sink_spec.get("kind") == "hdf5":
        path = sink_spec.get("path")
    else:
        return None
    from .hdf5 import HDF5Sink

    kwargs = {k: v for k, v in sink_spec.items() if k in ("chunk_bytes", "flush_every_s", "overwrite")} \
        if isinstance(sink_spec, dict) else {}
    sink = HDF5Sink(path, **kwargs)
    HDF5Sink.check_writable(path, overwrite=sink.overwrite)
    return sink
