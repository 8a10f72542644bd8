"""Read a dataset written by the dataset sink (dmi/sinks/dataset.py) as one run, across its
shards and writers (ranks, servers), with the same API as a file: `dmi.open(dir_or_manifest)`.

Request ids: each writer names its own requests. When no id occurs in two writers' manifests
the ids are kept as they are; when one does (two HF processes both start at "0"), every id is
qualified as "rank<r>/<id>" so rows are never attributed to another writer's request.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from dmi.reader.columns import ColumnRun, Columns, columns
from dmi.reader.run import _unknown
from dmi.sinks.dataset import FORMAT, FORMAT_VERSION, GAPS_DIR, MANIFEST_PREFIX, filesystem


def is_dataset(path: Any) -> bool:
    """A dataset folder or URL, or one of its manifests (anything dmi.open should not treat as HDF5)."""
    import os

    p = os.fspath(path) if not isinstance(path, str) else path
    if "://" in p:
        return True
    if p.rsplit("/", 1)[-1].startswith(MANIFEST_PREFIX):
        return True
    if os.path.isdir(p):
        return any(n.startswith(MANIFEST_PREFIX) for n in os.listdir(p))
    return False


class DatasetRun(ColumnRun):
    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        import os

        self.path = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self.fs, root = filesystem(self.path, storage_options)
        self.fs.invalidate_cache()   # fsspec reuses instances: forget listings from before other writers' shards
        base = root.rsplit("/", 1)[-1]
        if base.startswith(MANIFEST_PREFIX):         # one writer's manifest
            self.root = root.rsplit("/", 1)[0] if "/" in root else "."
            names = [root]
        else:
            self.root = root
            try:
                names = sorted(p for p in self.fs.ls(root, detail=False)
                               if p.rsplit("/", 1)[-1].startswith(MANIFEST_PREFIX))
            except FileNotFoundError:
                names = []
        if not names:
            raise FileNotFoundError(f"no dmi dataset at {self.path!r}: no {MANIFEST_PREFIX}*.json manifest there")
        self.manifests = [self._load_manifest(n) for n in names]
        self.manifests.sort(key=lambda m: m["rank"])
        self._qualify = _ids_collide([m["requests"] for m in self.manifests])
        self._requests = [self._qualified(m["rank"], r) for m in self.manifests for r in m["requests"]]
        self._request_at = {r: i for i, r in enumerate(self._requests)}
        self._hook_meta: dict[str, dict[str, Any]] = {}
        for m in self.manifests:
            for name, h in m["hooks"].items():
                if h.get("shard"):
                    raise ValueError(f"{self.path!r}: hook {name!r} of rank {m['rank']} holds a tensor-parallel slice "
                                     f"of each row; merging slices is read from HDF5 rank files only")
                have = self._hook_meta.setdefault(name, dict(h))
                if have["dtype"] != h["dtype"] or (not h["ragged"] and have["row_shape"] != h["row_shape"]):
                    raise ValueError(f"{self.path!r}: hook {name!r} has dtype/row shape {have['dtype']} "
                                     f"{have['row_shape']} in one rank and {h['dtype']} {h['row_shape']} in rank "
                                     f"{m['rank']}")
        self._cols: dict[str, Columns] = {}

    def _load_manifest(self, path: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.fs.cat_file(path))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path!r} is not a readable dmi dataset manifest: {e}") from e
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a dmi dataset manifest (format {doc.get('format')!r})")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path!r} has dmi-dataset format_version {doc['format_version']}; this dmi reads up "
                             f"to {FORMAT_VERSION}, upgrade dmi")
        return doc

    def _qualified(self, rank: int, rid: str) -> str:
        return f"rank{rank}/{rid}" if self._qualify else rid

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._cols.clear()

    def refresh(self) -> DatasetRun:
        fresh = DatasetRun(self.path, self.storage_options)
        self.__dict__.update(fresh.__dict__)
        return self

    def __repr__(self) -> str:
        return (f"<dmi.DatasetRun {self.path!r} {'complete' if self.complete else 'INCOMPLETE'} "
                f"ranks={len(self.manifests)} requests={len(self.requests)} hooks={len(self.hooks)}>")

    # -- metadata ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[str]:
        return list(self._requests)

    @property
    def meta(self) -> dict[str, Any]:
        out = dict(self.manifests[0]["meta"])
        out["format"], out["format_version"] = FORMAT, max(int(m["format_version"]) for m in self.manifests)
        out["complete"] = self.complete
        out["ranks"] = [m["rank"] for m in self.manifests]
        out["request_ids_qualified"] = self._qualify
        return json.loads(json.dumps(out))

    @property
    def complete(self) -> bool:
        return all(m.get("complete") for m in self.manifests)

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.manifests[0]["meta"].get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def stats(self) -> dict[str, Any]:
        """One writer's stats as written; several: their per-hook counters summed, each under "ranks"."""
        per = [m.get("stats", {}) for m in self.manifests]
        if len(per) == 1:
            return per[0]
        hooks: dict[str, dict[str, int]] = {}
        for s in per:
            for hook, c in s.get("hooks", {}).items():
                into = hooks.setdefault(hook, {})
                for k, v in c.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        into[k] = into.get(k, 0) + v
        rows: dict[str, int] = {}
        for c in hooks.values():
            for k, v in c.items():
                rows[k] = rows.get(k, 0) + v
        return {"hooks": hooks, "rows": rows, "ranks": per}

    def dtype(self, hook: str) -> str:
        return self._meta_of(hook)["dtype"]

    def ragged(self, hook: str) -> bool:
        return bool(self._meta_of(hook)["ragged"])

    def source(self, hook: str) -> str:
        return self._meta_of(hook).get("source", "")

    def shard(self, hook: str) -> None:
        self._meta_of(hook)
        return None

    def num_rows(self, hook: str) -> int:
        self._meta_of(hook)
        return sum(s["rows"] for m in self.manifests for s in m["shards"] if s.get("hook") == hook)

    def nbytes(self, hook: str) -> int:
        self._meta_of(hook)
        return sum(s.get("bytes", 0) for m in self.manifests for s in m["shards"] if s.get("hook") == hook)

    def shards_of(self, hook: str) -> list[tuple[str, int]]:
        """(full path, rank) of each listed shard of the hook."""
        return [(f"{self.root}/{s['path']}", m["rank"]) for m in self.manifests for s in m["shards"]
                if not s.get("gaps") and s["hook"] == hook]

    def shard_paths(self, hook: str | None = None) -> list[str]:
        """Full paths of the listed (complete) shards, of one hook or all; data_files for
        `datasets.load_dataset("parquet", ...)`, or pyarrow.dataset / ray.data.read_parquet."""
        return [f"{self.root}/{s['path']}" for m in self.manifests for s in m["shards"]
                if not s.get("gaps") and (hook is None or s["hook"] == hook)]

    # -- rows --------------------------------------------------------------------------------

    def _all_gaps(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        out = []
        for m in self.manifests:
            for s in m["shards"]:
                if not s.get("gaps"):
                    continue
                t = pq.read_table(f"{self.root}/{s['path']}", filesystem=self.fs).to_pylist()
                for g in t:
                    g["request"] = self._qualified(m["rank"], g["request"])
                    out.append(g)
        return out

    # -- internals ---------------------------------------------------------------------------

    def _meta_of(self, hook: str) -> dict[str, Any]:
        h = self._hook_meta.get(hook)
        if h is None:
            raise _unknown("hook", hook, self.hooks)
        return h

    def _stored_hooks(self) -> list[str]:
        return list(self._hook_meta)

    def _request_table(self) -> dict[str, int]:
        return self._request_at

    def _columns(self, hook: str) -> Columns:
        got = self._cols.get(hook)
        if got is not None:
            return got
        import pyarrow.parquet as pq

        h = self._meta_of(hook)
        datas, reqs, poss, steps = [], [], [], []
        for m in self.manifests:
            for s in m["shards"]:
                if s.get("hook") != hook:
                    continue
                path = f"{self.root}/{s['path']}"
                if path.endswith(".safetensors"):
                    data, ids, pos, step = read_safetensors(self.fs.cat_file(path))
                else:
                    t = pq.read_table(path, filesystem=self.fs)
                    data, ids = table_rows(t, h), t.column("request").to_pylist()
                    pos, step = t.column("position").to_numpy(), t.column("step").to_numpy()
                datas.append(data)
                reqs.append(np.fromiter((self._request_at[self._qualified(m["rank"], r)] for r in ids),
                                        np.int64, len(ids)))
                poss.append(pos)
                steps.append(step)
        got = self._cols[hook] = columns(datas, reqs, poss, steps, bool(h["ragged"]),
                                         np.zeros((0, *h["row_shape"]), _np_dtype(h["dtype"])))
        return got


def decode_rows(column, dtype: str, row_shape) -> np.ndarray:
    """Rows of a `data` column written with value_encoding "bytes" as an array [n, *row_shape]:
    a pyarrow (chunked) array, or what datasets or Ray hand out (a list or array of bytes).
    bfloat16 comes back as its uint16 bit patterns, as from every dmi reader."""
    np_dtype = _np_dtype(dtype)
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    if hasattr(column, "buffers"):   # Arrow: the values buffer, no copy
        width = column.type.byte_width
        raw = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * width:(column.offset + len(column)) * width]
    else:
        raw = np.frombuffer(b"".join(bytes(r) for r in column), np.uint8)
    return raw.view(np_dtype).reshape(-1, *row_shape)


def table_rows(table, hook_meta: dict[str, Any]) -> np.ndarray:
    """The `data` column of a shard as [n, *row_shape] (ragged rows zero-padded to the widest)."""
    import pyarrow as pa

    col = table.column("data").combine_chunks()
    if pa.types.is_fixed_size_binary(col.type):
        return decode_rows(col, hook_meta["dtype"], hook_meta["row_shape"])
    n = len(col)
    values = col.flatten().to_numpy(zero_copy_only=False)
    if not hook_meta["ragged"]:
        return values.reshape(n, *hook_meta["row_shape"])
    inner = tuple(hook_meta["row_shape"][:-1])
    widths = table.column("width").to_numpy()
    w = int(widths.max()) if n else 0
    out = np.zeros((n, *inner, w), dtype=values.dtype)
    offsets = col.offsets.to_numpy()
    for i in range(n):
        out[i, ..., : widths[i]] = values[offsets[i]:offsets[i + 1]].reshape(*inner, widths[i])
    return out


def read_safetensors(payload: bytes) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """(data [n, *row] as stored, request id per row, position, step) of a safetensors shard.
    Ragged rows were written zero-padded to the shard's widest, which is how they are read."""
    import struct

    from safetensors.torch import load

    t = load(payload)
    header = json.loads(payload[8:8 + struct.unpack("<Q", payload[:8])[0]])
    ids = json.loads(header["__metadata__"]["requests"])
    data = t["data"]
    if data.dtype == torch.bfloat16:   # kept as uint16 bit patterns, like every other reader
        data = data.view(torch.int16)
    out = data.numpy()
    if out.dtype == np.int16:
        out = out.view(np.uint16)
    return out, [ids[i] for i in t["request_index"].tolist()], t["position"].numpy(), t["step"].numpy()


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(np.uint16)
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(np.uint8)


def _ids_collide(per_rank: list[list[str]]) -> bool:
    seen: set[str] = set()
    for ids in per_rank:
        s = set(ids)
        if seen & s:
            return True
        seen |= s
    return False
