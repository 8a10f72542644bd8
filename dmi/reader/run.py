"""Read a run written by the HDF5 sink back as torch tensors, per hook and request."""
from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import torch

from dmi.reader.views import RunViews
from dmi.sinks.hdf5 import FORMAT, FORMAT_VERSION

# A request's rows are spread over the file (requests are batched together), so reading them
# is a scattered read. When they are dense enough, one contiguous read plus a take is cheaper
# than a point selection with one hyperslab per row.
_DENSE_SPAN_FACTOR = 4
# Reads of a file that another process is still writing can hit chunks or index nodes past the
# end of file this reader saw at open (HDF5 without SWMR has no reader/writer ordering).
# Reopening picks up the newer end of file, so such reads are retried a few times.
_LIVE_RETRIES = 4

T = TypeVar("T")


def _live(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry `fn` after reopening the file when a read of an incomplete (live) run fails."""

    @functools.wraps(fn)
    def wrapper(self: Run, *args: Any, **kwargs: Any) -> T:
        if self._in_call:   # only the outermost public call retries
            return fn(self, *args, **kwargs)
        self._in_call = True
        try:
            attempt = 0
            while True:
                try:
                    return fn(self, *args, **kwargs)
                except (OSError, RuntimeError):
                    if self._complete_at_open or self._f is None or attempt >= _LIVE_RETRIES:
                        raise
                    attempt += 1
                    time.sleep(0.02 * attempt)
                    self._reopen()
        finally:
            self._in_call = False

    return wrapper


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders blocks.2 before blocks.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


def _unknown(kind: str, name: str, valid: list[str]) -> KeyError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if not valid:
        hint = f"; this run has no {kind}s"
    elif not close and len(valid) <= 10:
        hint = f"; valid {kind}s: {', '.join(repr(v) for v in valid)}"
    return KeyError(f"unknown {kind} {name!r}{hint}")


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _torch_dtype(name: str) -> torch.dtype | None:
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) else None


@dataclass
class _Index:
    """File rows of one hook ordered by (request, position); built once per hook."""

    order: np.ndarray       # int64 file row numbers, sorted by (request, position), stable
    requests: np.ndarray    # request index of each entry of `order`
    positions: np.ndarray   # position of each entry of `order`

    def rows_of(self, request_idx: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.requests, [request_idx, request_idx + 1])
        return self.order[lo:hi]

    def positions_of(self, request_idx: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.requests, [request_idx, request_idx + 1])
        return self.positions[lo:hi]


class Run(RunViews):
    """One captured run. Open with `open_run(path)`; use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"no such dmi run file: {self.path!r}")
        if p.is_dir():
            raise ValueError(f"{self.path!r} is a directory, not a dmi run file")
        self._f: h5py.File | None = _open_h5(self.path)
        try:
            fmt = _attr_value(self._f.attrs.get("format"))
            if fmt != FORMAT:
                raise ValueError(f"{self.path!r} is not a dmi run file "
                                 f"(format attribute is {fmt!r}, expected {FORMAT!r})")
            version = int(_attr_value(self._f.attrs.get("format_version", 0)))
            if version > FORMAT_VERSION:
                raise ValueError(f"{self.path!r} has dmi-hdf5 format_version {version}; this dmi "
                                 f"reads up to {FORMAT_VERSION}, upgrade dmi")
        except BaseException:
            self._f.close()
            raise
        self._complete_at_open = bool(_attr_value(self._f.attrs.get("complete", False)))
        self._in_call = False
        self._requests: list[str] | None = None
        self._request_pos: dict[str, int] | None = None
        self._hooks: list[str] | None = None
        self._index: dict[str, _Index] = {}
        self._steps: dict[str, np.ndarray] = {}
        self._meta: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _reopen(self) -> None:
        # Cached indexes stay valid: a sink only appends rows and never rewrites earlier ones.
        old, self._f = self._f, None
        if old is not None:
            old.close()
        self._f = _open_h5(self.path)

    def refresh(self) -> Run:
        """Catch up with a run another process is still writing: reopen the file and forget the
        cached request list, hook list and indexes, so rows committed since are visible."""
        self._reopen()
        self._requests = self._request_pos = self._hooks = self._meta = None
        self._index.clear()
        self._steps.clear()
        self._complete_at_open = bool(_attr_value(self.file.attrs.get("complete", False)))
        return self

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def file(self) -> h5py.File:
        """The underlying h5py file, for anything the Run API does not cover."""
        if self._f is None:
            raise ValueError(f"run {self.path!r} is closed")
        return self._f

    def __repr__(self) -> str:
        if self._f is None:
            return f"<dmi.Run {self.path!r} (closed)>"
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"<dmi.Run {self.path!r} {state} model={self.meta.get('model')!r} "
                f"requests={len(self.requests)} hooks={len(self.hooks)}>")

    # -- metadata ----------------------------------------------------------------------------

    @property
    @_live
    def requests(self) -> list[str]:
        if self._requests is None:
            ds = self.file["requests"]
            n = self._committed(self.file.attrs, ds.shape[0], "committed_requests")
            self._requests = [str(s) for s in ds.asstr()[:n]] if n else []
        return list(self._requests)

    @property
    @_live
    def hooks(self) -> list[str]:
        if self._hooks is None:
            # Forward order, as the session selected them; hooks the file has beyond that list
            # (a plugin sink's, a newer writer's) follow in natural order.
            stored = set(self.file["hooks"].keys())
            selected = self.meta.get("hooks")
            first = [h for h in selected if h in stored] if isinstance(selected, list) else []
            self._hooks = first + sorted(stored - set(first), key=natural_key)
        return list(self._hooks)

    @property
    @_live
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            attrs = {k: _attr_value(v) for k, v in self.file.attrs.items()}
            json_attrs = json.loads(attrs.pop("json_attrs", '["model_config", "spec"]'))
            for key in json_attrs:
                if isinstance(attrs.get(key), str):
                    attrs[key] = json.loads(attrs[key])
            attrs["complete"] = bool(attrs.get("complete", False))
            self._meta = attrs
        return copy.deepcopy(self._meta)

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.meta.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    @_live
    def stats(self) -> dict[str, Any]:
        grp = self.file.get("stats")
        if grp is None or "json" not in grp.attrs:
            return {}
        return json.loads(_attr_value(grp.attrs["json"]))

    @_live
    def dtype(self, hook: str) -> str:
        """Torch dtype name of the hook's rows, e.g. "bfloat16"."""
        return str(_attr_value(self._group(hook).attrs["dtype"]))

    @_live
    def shape(self, hook: str) -> tuple[int, ...]:
        """Row shape; for ragged hooks the last dim is the widest row stored."""
        return tuple(int(d) for d in self._group(hook)["data"].shape[1:])

    @_live
    def ragged(self, hook: str) -> bool:
        return bool(self._group(hook).attrs.get("ragged", False))

    @_live
    def source(self, hook: str) -> str:
        return str(_attr_value(self._group(hook).attrs.get("source", "")))

    @_live
    def shard(self, hook: str) -> tuple[int, int, int, int] | None:
        """(dim, start, stop, full): the slice of each row this file holds, when a tensor-parallel
        rank captured only part of it; None when rows are whole."""
        value = self._group(hook).attrs.get("shard")
        return None if value is None else tuple(int(v) for v in _attr_value(value))

    @_live
    def num_rows(self, hook: str) -> int:
        grp = self._group(hook)
        return self._committed(grp.attrs, grp["data"].shape[0])

    def _committed(self, attrs, stored: int, key: str = "committed") -> int:
        """Rows a reader may trust: all of a complete run; of an incomplete (live or crashed)
        one, those its last commit counted (files without counters: all stored)."""
        if self._complete_at_open or key not in attrs:
            return int(stored)
        return min(int(attrs[key]), int(stored))

    @_live
    def nbytes(self, hook: str) -> int:
        """Bytes the hook's data occupies in the file (whole chunks, so at least one chunk)."""
        return int(self._group(hook)["data"].id.get_storage_size())

    @_live
    def data_bytes(self, hook: str) -> int:
        """Bytes of the rows themselves: rows x row size."""
        ds = self._group(hook)["data"]
        return int(self.num_rows(hook) * int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)

    # -- rows --------------------------------------------------------------------------------

    @_live
    def get(self, hook: str, request: str) -> torch.Tensor:
        """The request's rows of `hook`, ordered by position: [n_rows, *row_shape]."""
        grp = self._group(hook)
        req = self._request_idx(request)
        idx = self._hook_index(hook)
        rows = idx.rows_of(req)
        ds = grp["data"]
        if rows.size == 0:
            return self._to_tensor(np.zeros((0, *ds.shape[1:]), dtype=ds.dtype), hook)
        trim: tuple[Any, ...] = ()
        if self.ragged(hook):
            width = min(int(idx.positions_of(req).max()) + 1, ds.shape[-1])
            trim = (Ellipsis, slice(0, width))
        return self._to_tensor(_read_rows(ds, rows, trim), hook)

    @_live
    def positions(self, hook: str, request: str) -> torch.Tensor:
        self._group(hook)
        req = self._request_idx(request)
        return torch.from_numpy(self._hook_index(hook).positions_of(req).copy())

    @_live
    def steps(self, hook: str, request: str) -> torch.Tensor:
        grp = self._group(hook)
        req = self._request_idx(request)
        rows = self._hook_index(hook).rows_of(req)
        col = self._steps.get(hook)
        if col is None:
            col = self._steps[hook] = grp["step"][: self.num_rows(hook)].astype(np.int64, copy=False)
        return torch.from_numpy(col[rows])

    @_live
    def read_rows(self, hook: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of `hook` in file (arrival) order, untrimmed; for scans over big files."""
        n = self.num_rows(hook)
        stop = n if stop is None else min(stop, n)
        return self._to_tensor(self._group(hook)["data"][start:stop], hook)

    @_live
    def gaps(self, hook: str | None = None, request: str | None = None) -> list[dict[str, Any]]:
        """Dropped rows, as dicts with hook, request, position, step and reason."""
        g = self.file.get("gaps")
        n = 0 if g is None else self._committed(g.attrs, g["request"].shape[0])
        empty = n == 0
        hooks = np.empty(0, dtype=object) if empty else np.asarray(g["hook"].asstr()[:n], dtype=object)
        # A hook may appear only here (every row of it dropped), so both places count as known.
        if hook is not None and hook not in self.hooks and not np.any(hooks == hook):
            raise _unknown("hook", hook, sorted(set(self.hooks) | set(hooks.tolist()), key=natural_key))
        req_idx = self._request_idx(request) if request is not None else None
        if empty:
            return []
        reqs = g["request"][:n]
        mask = np.ones(reqs.shape[0], dtype=bool)
        if hook is not None:
            mask &= hooks == hook
        if req_idx is not None:
            mask &= reqs == req_idx
        names = self.requests
        pos, step = g["position"][:n], g["step"][:n]
        reasons = g["reason"].asstr()[:n]
        return [{"hook": str(hooks[i]), "request": names[reqs[i]] if 0 <= reqs[i] < len(names) else None,
                 "position": int(pos[i]), "step": int(step[i]), "reason": str(reasons[i])}
                for i in np.flatnonzero(mask)]

    # -- internals ---------------------------------------------------------------------------

    def _group(self, hook: str) -> h5py.Group:
        grp = self.file["hooks"].get(hook) if "/" not in hook else None
        if grp is None:
            raise _unknown("hook", hook, self.hooks)
        return grp

    def _request_idx(self, request: str | int) -> int:
        request = self.request_id(request)
        if self._request_pos is None:
            self._request_pos = {r: i for i, r in enumerate(self.requests)}
        i = self._request_pos.get(request)
        if i is None:
            raise _unknown("request", request, self.requests)
        return i

    def _hook_index(self, hook: str) -> _Index:
        idx = self._index.get(hook)
        if idx is None:
            grp = self._group(hook)
            n = self.num_rows(hook)
            req = grp["request"][:n].astype(np.int64, copy=False)
            pos = grp["position"][:n].astype(np.int64, copy=False)
            # lexsort is stable, so duplicate (request, position) rows keep file order.
            order = np.lexsort((pos, req))
            idx = self._index[hook] = _Index(order=order.astype(np.int64, copy=False),
                                             requests=req[order], positions=pos[order])
        return idx

    def _to_tensor(self, a: np.ndarray, hook: str) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        want = _torch_dtype(self.dtype(hook))
        if want is not None and want != t.dtype and want.itemsize == t.dtype.itemsize:
            # Dtypes numpy lacks (bfloat16, float8) are stored as same-width bit patterns.
            t = t.view(want)
        return t


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, trim: tuple[Any, ...]) -> np.ndarray:
    """ds[rows, *trim] for arbitrary (unsorted, unique) row numbers, in the order given."""
    sorted_rows = np.sort(rows)
    lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
    if hi - lo <= _DENSE_SPAN_FACTOR * rows.size:
        block = ds[(slice(lo, hi), *trim)]
        return block[rows - lo]
    # h5py point selections need increasing indices; read sorted, then put back in order.
    block = ds[(sorted_rows, *trim)]
    return block[np.searchsorted(sorted_rows, rows)]


def _open_h5(path: str) -> h5py.File:
    # locking=False: a sink in another process may still hold the file open for writing.
    # HDF5 refuses a second open of one file within a process unless the locking flags match
    # the first open's, so when this process already has it open (a live sink, which uses
    # "best-effort", or a plain h5py.File), retry with those flags.
    error: OSError | None = None
    for locking in (False, "best-effort", None):
        try:
            return h5py.File(path, "r", locking=locking)
        except OSError as e:
            error = e
            if "locking" not in str(e):
                break
    raise ValueError(f"{path!r} is not a readable HDF5 file: {error}") from error


def open_run(path: str | os.PathLike[str], merge_ranks: bool = True, storage_options: dict | None = None):
    """Open a dmi HDF5 run for reading (safe while another process is still writing it), or a
    dataset (a folder, URL or manifest the dataset sink wrote) as one run across its writers.

    A run captured under tensor parallelism is rank 0's file plus "<path>.rank<r>" per other
    rank; with merge_ranks (the default) they read as one run (dmi.reader.ranks)."""
    from dmi.reader.dataset import is_dataset

    if is_dataset(path):  # a dataset folder, URL or manifest (dmi/sinks/dataset.py)
        from dmi.reader.dataset import DatasetRun

        return DatasetRun(path, storage_options)
    run = Run(path)
    if not merge_ranks:
        return run
    from dmi.reader.ranks import open_ranks

    try:
        return open_ranks(run)
    except BaseException:
        run.close()
        raise
