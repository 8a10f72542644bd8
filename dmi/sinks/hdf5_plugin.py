"""Registers the HDF5 sink for string paths and {"kind": "hdf5", "path": ...}."""
from __future__ import annotations

import os

from dmi.plugins import hookimpl

FIELDS = ("kind", "path", "chunk_bytes", "flush_every_s", "overwrite", "release_pages")


@hookimpl
def dmi_sink_for(sink_spec):
    if isinstance(sink_spec, str):
        if sink_spec == "memory":  # the memory sink's name; a file called so is "./memory"
            return None
        path = sink_spec
    elif isinstance(sink_spec, dict) and sink_spec.get("kind") == "hdf5":
        unknown = set(sink_spec) - set(FIELDS)
        if unknown:
            from dmi.errors import SpecError

            raise SpecError("sink", f"unknown field(s) {sorted(unknown)} for the HDF5 sink; valid: {', '.join(FIELDS)}")
        path = sink_spec.get("path")
        if not isinstance(path, (str, os.PathLike)):
            from dmi.errors import SinkPathError

            raise SinkPathError(f"{{'kind': 'hdf5'}} needs 'path': the output file, got {path!r}", field="sink.path")
    else:
        return None
    from .hdf5 import HDF5Sink

    kwargs = {k: v for k, v in sink_spec.items() if k not in ("kind", "path")} if isinstance(sink_spec, dict) else {}
    sink = HDF5Sink(path, **kwargs)
    _check_not_open_here(sink.path)  # first: an open reader is the likelier reason the path exists
    HDF5Sink.check_writable(path, overwrite=sink.overwrite)
    return sink


def _check_not_open_here(path: str) -> None:
    """HDF5 cannot recreate a file this process still has open (a Run from dmi.open, a
    plain h5py.File); say which file and what to close, before anything is created."""
    import h5py

    target = os.path.realpath(path)
    for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            name = os.fsdecode(fid.name)
        except Exception:  # an id closed meanwhile
            continue
        if os.path.realpath(name) == target:
            from dmi.errors import SinkPathError

            raise SinkPathError(f"cannot write HDF5 output {path!r}: this process still has it open for "
                                f"reading (a dmi.open run or an h5py.File); close it first (run.close(), or "
                                f"`with dmi.open(...) as run:`), or write to another path")
