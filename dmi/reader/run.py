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

from dmi.errors import RunFileError
from dmi.reader import salvage as _salvage
from dmi.reader.views import RunViews, UnknownName
from dmi.sinks.hdf5 import FORMAT, FORMAT_VERSION

# A request's rows are spread over the file (requests are batched together), so reading them
# is a scattered read. When they are dense enough, one contiguous read plus a take is cheaper
# than a point selection with one hyperslab per row.
_DENSE_SPAN_FACTOR = 4
# Reads of a file that another process is still writing can hit chunks or index nodes past the
# end of file this reader saw at open (HDF5 without SWMR has no reader/writer ordering).
# Reopening picks up the newer end of file, so such reads are retried. A writer that commits
# often (a served engine commits for every response that reads its rows back) rewrites the
# books' attribute each time, and a reader can land in several rewrites in a row (CI saw "bad
# heap index" after four tries within 0.2 s): up to about 1 s of retries before calling the
# file damaged.
_LIVE_RETRIES = 12
_LIVE_BACKOFF_S = 0.02, 0.1  # per attempt, and at most

T = TypeVar("T")


# What h5py raises on a damaged file (a bad checksum, a chunk index pointing nowhere, bytes that
# do not decode): turned into a RunFileError naming the file and what was being read.
_DAMAGE = (OSError, RuntimeError, KeyError, UnicodeDecodeError, json.JSONDecodeError)


class _UnknownName(UnknownName):
    """A hook or request the run does not have: the caller's mistake, not damage."""


def _live(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry `fn` after reopening the file when a read of an incomplete (live) run fails; a read
    that still fails means the file is damaged, which is said as such."""

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
                except (OSError, RuntimeError) as e:
                    if (self._complete_at_open or self._f is None or self._salvaged is not None
                            or attempt >= _LIVE_RETRIES):
                        raise _damaged(self.path, fn.__name__, e) from e
                    attempt += 1
                    time.sleep(min(_LIVE_BACKOFF_S[0] * attempt, _LIVE_BACKOFF_S[1]))
                    self._reopen()
                except UnknownName:
                    raise
                except _DAMAGE as e:
                    raise _damaged(self.path, fn.__name__, e) from e
        finally:
            self._in_call = False

    return wrapper


def _damaged(path: str, what: str, e: BaseException) -> RunFileError:
    if isinstance(e, RunFileError):
        return e
    return RunFileError(path, f"reading {what} failed, the file is damaged or was cut short "
                              f"({type(e).__name__}: {' '.join(str(e).split())})")


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
    return _UnknownName(f"unknown {kind} {name!r}{hint}")


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

    def __init__(self, path: str | os.PathLike[str], salvage: bool = False) -> None:
        self.path = os.fspath(path)
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"no such dmi run file: {self.path!r}")
        if p.is_dir():
            raise ValueError(f"{self.path!r} is a directory, not a dmi run file")
        # salvage: what of a truncated file survives (dmi.reader.salvage); None when not salvaged
        self._salvaged: dict[str, Any] | None = None
        self._raw: _salvage.PaddedFile | None = None
        self._f: h5py.File | None = None
        if salvage and _salvage.truncation(self.path) is not None:
            self._salvaged = _salvage.salvage_limits(self.path)
        self._open()
        try:
            fmt = _attr_value(self._f.attrs.get("format"))
            if fmt != FORMAT:
                raise RunFileError(self.path, f"not a dmi run file (format attribute is {fmt!r}, expected {FORMAT!r})")
            version = int(_attr_value(self._f.attrs.get("format_version", 0)))
            if version > FORMAT_VERSION:
                raise RunFileError(self.path, f"has dmi-hdf5 format_version {version}; this dmi reads up to "
                                              f"{FORMAT_VERSION}, upgrade dmi")
            self._complete_at_open = (self._salvaged is None
                                      and bool(_attr_value(self._f.attrs.get("complete", False))))
        except BaseException as e:
            self.close()
            if isinstance(e, _DAMAGE + (ValueError, TypeError)) and not isinstance(e, RunFileError):
                raise _damaged(self.path, "the file's attributes", e) from e
            raise
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
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def _open(self) -> None:
        if self._salvaged is None:
            self._f = _open_h5(self.path)
        else:
            self._f, self._raw = _salvage.open_padded(self.path, self._salvaged["length"])

    def _reopen(self) -> None:
        # Cached indexes stay valid: a sink only appends rows and never rewrites earlier ones.
        old, self._f = self._f, None
        if old is not None:
            old.close()
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._open()

    def refresh(self) -> Run:
        """Catch up with a run another process is still writing: reopen the file and forget the
        cached request list, hook list and indexes, so rows committed since are visible."""
        self._reopen()
        self._requests = self._request_pos = self._hooks = self._meta = None
        self._index.clear()
        self._steps.clear()
        self._complete_at_open = self._salvaged is None and bool(_attr_value(self.file.attrs.get("complete", False)))
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
            if self._salvaged is not None:
                n = min(n, self._salvaged["requests"])
            self._requests = [str(s) for s in ds.asstr()[:n]] if n else []
        return list(self._requests)

    @property
    @_live
    def hooks(self) -> list[str]:
        if self._hooks is None:
            # Every hook the session selected, in forward order, also those with no committed
            # row yet (a crashed or live run; they read as empty); hooks the file has beyond
            # that list (a plugin sink's, a newer writer's) follow in natural order.
            stored = set(self.file["hooks"].keys())
            selected = self.meta.get("hooks")
            first = [str(h) for h in selected] if isinstance(selected, list) else []
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
            attrs["complete"] = bool(attrs.get("complete", False)) and self._salvaged is None
            if self._salvaged is not None:
                attrs["salvaged"] = copy.deepcopy(self._salvaged)
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
        """The session's books as of the writer's last commit (at close for a complete run),
        plus `committed` per hook and in `rows`: the rows this file holds that a reader may
        trust. A file whose writer stopped before its first commit has no books: only
        `committed` then."""
        grp = self.file.get("stats")
        stats = json.loads(_attr_value(grp.attrs["json"])) if grp is not None and "json" in grp.attrs else {}
        if not isinstance(stats, dict):
            stats = {}
        per_hook = stats.get("hooks") if isinstance(stats.get("hooks"), dict) else {}
        committed = {h: self.num_rows(h) for h in self.hooks}
        for h in per_hook:
            committed.setdefault(h, 0)
        stats["hooks"] = {h: {**(per_hook.get(h) or {}), "committed": n} for h, n in committed.items()}
        stats["rows"] = {**(stats.get("rows") or {}), "committed": sum(committed.values())}
        if isinstance(stats.get("interventions"), dict):
            self._join_books(stats["interventions"])
        return stats

    def _join_books(self, ivs: dict) -> None:
        """The interventions' per-request ranges from /books (dmi/sinks/hdf5.py), into the
        totals the stats JSON holds: per (intervention, reason, request), its latest commit's."""
        for e in ivs.values():
            if isinstance(e, dict):
                e.setdefault("requests", {})
                e.setdefault("failed", {})
        g = self.file.get("books")
        grp = self.file.get("stats")
        if g is None or (grp is not None and grp.attrs.get("books_in_json")):
            return
        try:
            n = self._committed(g.attrs, g["start"].shape[0])
            if self._salvaged is not None:
                n = min(n, int(g.attrs.get("committed", 0)))
            if not n:
                return
            names = g["intervention"].asstr()[:n]
            reasons = g["reason"].asstr()[:n]
            req = g["request"][:n]
            start, stop, commit = g["start"][:n], g["stop"][:n], g["commit"][:n]
        except (OSError, KeyError, ValueError) as e:  # a damaged file: the totals stay, say what is missing
            for entry in ivs.values():
                if isinstance(entry, dict):
                    entry["books_error"] = f"per-request ranges unreadable: {e}"
            return
        latest: dict[tuple[str, str, int], tuple[int, list]] = {}  # key -> (its latest commit, its rows there)
        for k in range(n):
            key, c = (names[k], reasons[k], int(req[k])), int(commit[k])
            held = latest.get(key)
            if held is None or c > held[0]:
                held = latest[key] = (c, [])
            if c == held[0]:
                held[1].append([int(start[k]), int(stop[k])])
        ids = self.requests
        for (name, why, r), (_, ranges) in latest.items():
            entry = ivs.setdefault(name, {"requests": {}, "failed": {}})
            into = entry["requests"] if not why else entry["failed"].setdefault(why, {})
            into[ids[r] if 0 <= r < len(ids) else str(r)] = ranges

    @_live
    def dtype(self, hook: str) -> str | None:
        """Torch dtype name of the hook's rows, e.g. "bfloat16"; None for a hook with no row yet."""
        grp = self._group(hook)
        return None if grp is None else str(_attr_value(grp.attrs["dtype"]))

    @_live
    def shape(self, hook: str) -> tuple[int, ...]:
        """Row shape; for ragged hooks the last dim is the widest row stored; () with no row yet."""
        grp = self._group(hook)
        return () if grp is None else tuple(int(d) for d in grp["data"].shape[1:])

    @_live
    def ragged(self, hook: str) -> bool:
        grp = self._group(hook)
        return grp is not None and bool(grp.attrs.get("ragged", False))

    @_live
    def source(self, hook: str) -> str:
        grp = self._group(hook)
        return "" if grp is None else str(_attr_value(grp.attrs.get("source", "")))

    @_live
    def shard(self, hook: str) -> tuple[int, int, int, int] | None:
        """(dim, start, stop, full): the slice of each row this file holds, when a tensor-parallel
        rank captured only part of it; None when rows are whole."""
        grp = self._group(hook)
        value = None if grp is None else grp.attrs.get("shard")
        return None if value is None else tuple(int(v) for v in _attr_value(value))

    def holds(self, hook: str) -> bool:
        """Whether the file has stored rows of `hook` (a selected hook may have none yet)."""
        return self._group(hook) is not None

    @_live
    def num_rows(self, hook: str) -> int:
        grp = self._group(hook)
        if grp is None:
            return 0
        n = self._committed(grp.attrs, grp["data"].shape[0])
        if self._salvaged is not None:
            n = min(n, self._salvaged["hooks"].get(hook, 0))
        return n

    def _committed(self, attrs, stored: int, key: str = "committed") -> int:
        """Rows a reader may trust: all of a complete run; of an incomplete (live or crashed)
        one, those its last commit counted (files without counters: all stored)."""
        if self._complete_at_open or key not in attrs:
            return int(stored)
        return min(int(attrs[key]), int(stored))

    @_live
    def nbytes(self, hook: str) -> int:
        """Bytes the hook's data occupies in the file (whole chunks, so at least one chunk)."""
        grp = self._group(hook)
        return 0 if grp is None else int(grp["data"].id.get_storage_size())

    @_live
    def data_bytes(self, hook: str) -> int:
        """Bytes of the rows themselves: rows x row size."""
        grp = self._group(hook)
        if grp is None:
            return 0
        ds = grp["data"]
        return int(self.num_rows(hook) * int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)

    # -- rows --------------------------------------------------------------------------------

    @_live
    def get(self, hook: str, request: str) -> torch.Tensor:
        """The request's rows of `hook`, ordered by position: [n_rows, *row_shape] (shape [0]
        for a hook the file holds no row of yet)."""
        grp = self._group(hook)
        req = self._request_idx(request)
        if grp is None:
            return torch.empty(0)
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
        grp = self._group(hook)
        req = self._request_idx(request)
        if grp is None:
            return torch.empty(0, dtype=torch.int64)
        return torch.from_numpy(self._hook_index(hook).positions_of(req).copy())

    @_live
    def steps(self, hook: str, request: str) -> torch.Tensor:
        grp = self._group(hook)
        req = self._request_idx(request)
        if grp is None:
            return torch.empty(0, dtype=torch.int64)
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
        grp = self._group(hook)
        if grp is None:
            return torch.empty(0)
        return self._to_tensor(grp["data"][start:stop], hook)

    @_live
    def gaps(self, hook: str | None = None, request: str | None = None) -> list[dict[str, Any]]:
        """Dropped rows, as dicts with hook, request, position, step and reason."""
        g = self.file.get("gaps")
        n = 0 if g is None else self._committed(g.attrs, g["request"].shape[0])
        if self._salvaged is not None:
            n = min(n, self._salvaged["gaps"])
        empty = n == 0
        hooks = np.empty(0, dtype=object) if empty else np.asarray(g["hook"].asstr()[:n], dtype=object)
        rid = self._gap_query(hook, request, set(hooks.tolist()))
        req_idx = self._request_idx(rid) if rid is not None else None
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

    def _group(self, hook: str) -> h5py.Group | None:
        """The hook's group; None for a selected hook the file has no row of yet."""
        grp = self.file["hooks"].get(hook) if "/" not in hook else None
        if grp is None and hook not in self.hooks:
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
    cut = _salvage.truncation(path)
    if cut is not None:
        raise RunFileError(path, f"truncated: {cut[0]} of the {cut[1]} bytes its HDF5 superblock records are "
                                 f"present (a copy, download or disk cut it short); dmi.open(path, salvage=True) "
                                 f"reads the rows that survive") from error
    raise RunFileError(path, f"not a readable HDF5 file: {error}") from error


def open_run(path: str | os.PathLike[str], merge_ranks: bool = True, salvage: bool = False,
             storage_options: dict | None = None):
    """Open a dmi HDF5 run for reading (safe while another process is still writing it), or a
    dataset (a folder, URL or manifest the dataset sink wrote) as one run across its writers.

    A run captured under tensor parallelism is rank 0's file plus "<path>.rank<r>" per other
    rank; with merge_ranks (the default) they read as one run (dmi.reader.ranks).
    salvage=True reads what survives of a file cut short (dmi.reader.salvage); `run.meta
    ["salvaged"]` then says how much was present, and the run reads as incomplete."""
    from dmi.reader.dataset import is_dataset

    if is_dataset(path):  # a dataset folder, URL or manifest (dmi/sinks/dataset.py)
        from dmi.reader.dataset import DatasetRun

        return DatasetRun(path, storage_options)
    run = Run(path, salvage=salvage)
    if not merge_ranks:
        return run
    from dmi.reader.ranks import open_ranks

    try:
        return open_ranks(run, salvage=salvage)
    except (ValueError, TypeError) as e:  # tensor-parallel attributes that do not parse
        run.close()
        if isinstance(e, RunFileError):
            raise
        raise _damaged(run.path, "the tensor-parallel attributes", e) from e
    except BaseException:
        run.close()
        raise
