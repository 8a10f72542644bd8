"""The benchmark's HDF5 file: one table row per (cell, mode, repeat), environment as attributes."""
from __future__ import annotations

import json

import h5py
import numpy as np

COLUMNS = (("engine", "S16"), ("mode", "S24"), ("batch", "i8"), ("decode_len", "i8"), ("prompt_len", "i8"),
           ("repeat", "i8"), ("seconds", "f8"), ("tokens_per_s", "f8"), ("step_ms", "f8"),
           ("bytes_captured", "i8"), ("rows_dropped", "i8"), ("close_s", "f8"), ("peak_mem", "i8"),
           ("status", "S96"), ("cpu_s", "f8"))


class Results:
    def __init__(self, path: str):
        self.path = path

    def write(self, rows: list[dict], attrs: dict) -> None:
        table = np.array([tuple(_cell(r.get(c, float("nan")), t) for c, t in COLUMNS) for r in rows],
                         dtype=list(COLUMNS))
        with h5py.File(self.path, "w") as f:
            f.create_dataset("results", data=table)
            for k, v in attrs.items():
                # str(): version objects are str subclasses h5py can't store
                f.attrs[k] = str(v) if isinstance(v, str) else v if isinstance(v, (int, float)) else json.dumps(v)
            f.attrs["format"] = "dmi-matrix-bench"
            f.attrs["format_version"] = 1


def _cell(v, t):
    return str(v).encode()[: int(t[1:])] if t.startswith("S") else v


def read(path: str) -> list[dict]:
    with h5py.File(path, "r") as f:
        table = f["results"][()]
    return [{k: (v.decode() if isinstance(v, bytes) else v.item()) for k, v in zip(table.dtype.names, row)}
            for row in table]
