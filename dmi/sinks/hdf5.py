"""HDF5 sink: one self-describing file per run, readable with plain h5py.

Layout (format_version 1):

    /                 attrs: format="dmi-hdf5", format_version, dmi_version, engine, model,
                      model_config (JSON), spec (JSON), created (ISO time), complete (bool),
                      json_attrs (JSON list of the attrs that hold JSON), one attr per meta.extra key
    /requests         vlen utf-8 [R]: request ids in first-seen order; rows point here by int32 index
    /hooks/<name>/    attrs: dtype (torch name), row_shape, ragged, source; shard (dim, start,
                      stop, full) when a tensor-parallel rank holds a slice of the row (dim -1:
                      one of `full` partial sums of the row, part `start`)
        data          [N, *row_shape]; bfloat16 kept as uint16 bit patterns, ragged last dim grows
        request       int32 [N]
        position      int64 [N]
        step          int64 [N]
    /gaps/            hook (vlen str), request (int32), position, step (int64), reason (vlen str)
    /stats            attr json: the run's stats dict; interventions without their per-request ranges
    /books/           the interventions' per-request ranges, appended at each commit for the
                      (intervention, reason, request) whose ranges changed since the last one:
                      intervention, reason (vlen str; "" applied), request (int32), start, stop,
                      commit (int64); for each (intervention, reason, request) the rows of its
                      latest commit are its ranges. attrs: committed. Absent without interventions.
                      A close whose last commit failed leaves the full books in /stats instead
                      (its attr books_in_json), newer than /books

Everything is resizable along axis 0 and appended chunk by chunk.

Crash safety: a flush is a two-phase commit. Phase 1 writes the buffered rows and flushes the
file (data and metadata reach the OS); phase 2 records how many rows are now durable in
counters (`committed` on each hook group and on /gaps, `committed_requests`, `commits`,
`committed_at` on the root) and flushes again. A process killed at any point leaves a file
whose counters name rows that were fully written before; readers of an incomplete file
(`complete` false) trust only those rows. A sink flushes every `flush_every_s` and whenever
the session flushes, so `session.flush()` returning means those frames are acknowledged.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:
    import resource
except ImportError:  # not on Windows
    resource = None

from dmi.sinks import h5append
from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta, Sink
from dmi.sinks.pagecache import PageRelease

log = logging.getLogger("dmi")

FORMAT = "dmi-hdf5"
FORMAT_VERSION = 1

# Root attrs the sink owns; meta.extra may not shadow them.
RESERVED_ATTRS = frozenset({
    "dmi_version", "format", "format_version", "engine", "model", "model_config",
    "spec", "created", "complete", "json_attrs", "commits", "committed_at", "committed_requests",
})

_STR = h5py.string_dtype("utf-8")
# Chunks are sized when a hook's first rows reach the file (its first append), from how many
# there are: a hook whose first append is small (a short run, closed before its buffer
# filled; or a slow one) gets chunks of that many rows, so a small run's file stays near the
# size of its rows; one that fills its buffer gets chunk_bytes chunks. Index columns are
# tiny per row; their chunks grow the same way up to _INDEX_CHUNK rows.
_INDEX_CHUNK = 4096
_MIN_INDEX_CHUNK = 64
# A floor for data chunks: a slow hook's first append (a timed flush) may be a few rows, and
# chunks that small would make a long run's chunk index huge.
_MIN_CHUNK_BYTES = 8 << 10
# Requests and gaps: small chunks (HDF5 allocates whole chunks; vlen strings are 16 bytes a slot).
_GAP_CHUNK = 256


def check_writable(path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Raise SinkPathError when `path` cannot be created as an HDF5 file, or holds a file
    already and `overwrite` is not set (a run is never replaced unasked)."""
    p = Path(os.fspath(path)).expanduser()
    if not overwrite and p.is_file():
        from dmi.errors import SinkPathError

        raise SinkPathError(f"the HDF5 output {os.fspath(path)!r} already exists; choose another path, remove "
                            f"it, or set overwrite: true in the spec to replace it")
    reason = _unwritable_reason(p)
    if reason is not None:
        from dmi.errors import SinkPathError

        raise SinkPathError(f"cannot write HDF5 output {os.fspath(path)!r}: {reason}")


def _unwritable_reason(p: Path) -> str | None:
    if not str(p):
        return "the path is empty"
    if p.is_dir():
        return "it is an existing directory, not a file"
    parent = p.absolute().parent
    if not parent.exists():
        return f"the parent folder {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"the parent {str(parent)!r} is not a folder"
    if p.exists() and not os.access(p, os.W_OK):
        return "the existing file is not writable"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the parent folder {str(parent)!r} is not writable"
    return None


def json_default(obj: Any) -> Any:
    """json.dumps fallback for the numpy values that end up in stats and configs."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default)


def _is_attr_scalar(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_, str, float, np.floating)):
        return True
    if isinstance(v, (int, np.integer)):
        # HDF5 has no arbitrary-precision ints; larger ones go through JSON.
        return -(1 << 63) <= int(v) < (1 << 63)
    return False


@dataclass
class _HookWriter:
    """Per-hook datasets plus the rows buffered for the next append. The group and datasets
    are None until the hook's first append creates them (_materialize)."""

    info: HookInfo
    group: h5py.Group | None
    data: h5py.Dataset | None
    request: h5py.Dataset | None
    position: h5py.Dataset | None
    step: h5py.Dataset | None
    dtype: np.dtype
    inner_shape: tuple[int, ...]   # row shape without the ragged last dim (whole row shape if not ragged)
    ragged: bool
    width: int                     # ragged: current last-dim size of `data`
    rows: int = 0                  # rows already in the datasets
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    buffered_bytes: int = 0
    # The index columns (request, position, step) of rows already in `data`, written at the next
    # commit: they are a few bytes a row, and three HDF5 appends per data append cost more than it.
    index_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    indexed: int = 0               # rows whose index columns are in the file


class HDF5Sink(Sink):
    """Writes a run to one HDF5 file, buffering rows per hook into chunk-sized appends."""

    check_writable = staticmethod(check_writable)

    def __init__(self, path: str, chunk_bytes: int = 256 << 10, flush_every_s: float = 2.0,
                 overwrite: bool = False, release_pages: bool = True) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.path = os.fspath(Path(os.fspath(path)).expanduser())
        self.overwrite = bool(overwrite)
        self.chunk_bytes = int(chunk_bytes)
        self.flush_every_s = float(flush_every_s)
        self._file: h5py.File | None = None
        # written pages go back to the kernel once on disk (see dmi.sinks.pagecache)
        self.pages = PageRelease(lambda: self._require_open().id.get_vfd_handle(), enabled=release_pages)
        self._hooks: dict[str, _HookWriter] = {}    # in the file (committed by _commit)
        self._staged: dict[str, _HookWriter] = {}   # seen, rows buffered, not in the file yet
        self._request_index: dict[str, int] = {}
        self._pending_requests: list[str] = []
        self._last_requests: tuple[list[str], np.ndarray] | None = None
        self.copied_bytes = 0  # host copies of row bytes this sink makes (none: blocks are written as handed over)
        self._stages: dict[str, list] = {}  # per hook: [buffer, rows handed out] (staging(), drain thread)
        self._books_error: str | None = None
        self._last_flush = time.monotonic()
        self._commits = 0
        self._dirty = False  # written since the last commit: close() commits again only then

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, meta: RunMeta) -> None:
        if self._file is not None:
            raise RuntimeError(f"HDF5Sink for {self.path!r} is already open")
        clash = RESERVED_ATTRS.intersection(meta.extra)
        if clash:
            raise ValueError(f"meta.extra keys {sorted(clash)} clash with reserved file attributes")
        check_writable(self.path, overwrite=self.overwrite)
        self._staged.clear()
        try:
            # v108 as the lower bound gives dense attribute storage (model configs can exceed the
            # 64 KiB compact-attribute limit) while keeping superblock v2: from v110 on, the
            # superblock marks the file "open for write" and readers refuse it until close,
            # which would hide a live or crashed run from `dmi inspect`.
            # "best-effort" locking keeps working on filesystems without lock support (NFS, Lustre).
            f = h5py.File(self.path, "w", libver="v108", locking="best-effort",
                          rdcc_nbytes=max(1 << 20, 2 * self.chunk_bytes))
        except OSError as e:
            from dmi.errors import SinkPathError

            raise SinkPathError(f"cannot write HDF5 output {self.path!r}: {e}") from e
        try:
            self._write_root_attrs(f, meta)
            f.create_dataset("requests", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(_GAP_CHUNK,))
            f.create_group("hooks")
            gaps = f.create_group("gaps")
            for name, dt in (("hook", _STR), ("request", np.int32), ("position", np.int64),
                             ("step", np.int64), ("reason", _STR)):
                gaps.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(_GAP_CHUNK,))
            f.attrs["commits"] = 0
            f.flush()
            self._file = f
            self._commits = 0
            self._commit()
        except BaseException:
            f.close()
            raise
        self._file = f
        self._inode = os.stat(self.path).st_ino
        self._last_flush = time.monotonic()

    def close(self, stats: dict[str, Any], complete: bool = True) -> None:
        f = self._file
        if f is None:
            return
        # Whatever fails, the file must end up closed and carry stats; a failed final flush
        # means rows were lost, so the run cannot be marked complete.
        error: BaseException | None = None
        try:
            self._flush_buffers()
            # the drain's stop marker committed just before: a second commit with nothing
            # new in it would cost a close several file flushes for nothing
            self._commit(only_if_changed=True)
        except BaseException as e:
            error = e
        try:
            grp = f.require_group("stats")
            stats = self._with_books_error(stats)
            if "books" in f:
                if error is None:  # the per-request ranges are in /books, up to date as of the commit above
                    stats = _without_ranges(stats)
                else:  # the last commit failed: the full books here are newer than /books
                    grp.attrs["books_in_json"] = True
            grp.attrs["json"] = _dumps(stats if stats is not None else {})
            f.attrs["complete"] = bool(complete) and error is None
            f.flush()
        finally:
            self._file = None
            self._hooks.clear()
            f.close()
        if error is not None:
            raise error

    def flush(self) -> None:
        f = self._require_open()
        self._check_still_there()
        self._flush_buffers()
        self._commit()     # phase 1, the rows are in the file; phase 2, say so
        self._last_flush = time.monotonic()

    def _ensure_room(self, nbytes: int) -> None:
        """Refuse a write the disk (or the process's file-size limit) cannot take, before HDF5
        starts it: HDF5 is left unusable by a write that fails half way (later calls, even
        close, fail and the process can crash at exit). The reserve keeps room for closing
        the file cleanly with its stats."""
        need = 2 * max(nbytes, self.chunk_bytes) + _CLOSE_RESERVE
        room = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
        if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)):
            room = min(room, limit - os.path.getsize(self.path))
        if room < need:
            raise OSError(errno.ENOSPC, f"no room for {nbytes} more bytes in {self.path!r} ({room} bytes left, "
                                        f"keeping {_CLOSE_RESERVE} to close the file cleanly); capture to it stops")

    def _check_still_there(self) -> None:
        """Writing on into a file someone removed or replaced would lose every row silently."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            raise OSError(f"the output file {self.path!r} was removed or replaced while capturing")

    def _commit(self, only_if_changed: bool = False) -> None:
        f = self._require_open()
        books = self._append_books()
        if books is None and only_if_changed and not self._dirty:
            return
        if self._dirty or books is not None:
            f.flush()  # phase 1: the rows are in the file before the counters below say so
        self._dirty = False
        if books is not None:
            books[0].attrs["committed"] = books[1]
        for hw in self._hooks.values():
            h5append.set_int(hw.group, "committed", hw.rows)
        gaps = f["gaps"]
        h5append.set_int(gaps, "committed", gaps["request"].id.shape[0])
        h5append.set_int(f, "committed_requests", f["requests"].id.shape[0])
        self._commits += 1
        h5append.set_int(f, "commits", self._commits)
        f.attrs["committed_at"] = datetime.now(timezone.utc).isoformat()
        # The books as of this commit, so a run that never reaches close() (killed, crashed)
        # still has them; close() overwrites them with the final ones.
        provider = self.stats_provider
        if provider is not None:
            try:
                stats = provider()
            except Exception as e:  # the books are worth less than the commit: keep committing
                stats = {"errors": [f"stats at commit failed: {type(e).__name__}: {e}"]}
            f.require_group("stats").attrs["json"] = _dumps(self._with_books_error(stats))
        f.flush()

    # -- rows --------------------------------------------------------------------------------

    def write(self, block: RowBlock) -> None:
        """Append a block. Commits happen only in flush() (the drain calls it between whole
        steps), so a reader never sees a step torn across hooks. The block is handed over
        (RowBlock): small blocks are kept by reference until their append, not copied."""
        self._require_open()
        data = block.data
        n = int(data.shape[0]) if data.ndim else 0
        name = block.hook.name
        _check_lengths(name, n, block.request_index, block.position, block.step)
        if not n:
            return
        hw = self._hooks.get(name) or self._staged.get(name)
        if hw is None:
            hw = self._create_hook(block.hook, data)
        data = self._conform(hw, block.hook, data)
        req = self._request_indices(block)
        pos = np.asarray(block.position, dtype=np.int64).reshape(n)
        step = np.asarray(block.step, dtype=np.int64).reshape(n)
        hw.parts.append((data, req, pos, step))
        hw.buffered_bytes += data.nbytes
        if hw.buffered_bytes >= self.chunk_bytes:
            self._append(hw)

    def staging(self, info: HookInfo, n: int, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Consecutive slices of one append's worth of rows (chunk_bytes): the drain gathers
        each block straight into the next slice, so an append of many small blocks is one
        contiguous array and one HDF5 write, with no copy of its own (h5py's per-call cost is
        many times a small block's write). Ragged hooks change width block to block: their own
        arrays. Called on the drain thread: a buffer is only ever appended to by it, and
        the sink thread reads only slices the drain has handed over."""
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if info.ragged or n * row_bytes >= self.chunk_bytes:
            return np.empty((n, *row_shape), dtype)
        st = self._stages.get(info.name)
        if st is None or st[1] + n > len(st[0]) or st[0].dtype != dtype or st[0].shape[1:] != tuple(row_shape):
            st = self._stages[info.name] = [np.empty((max(n, self.chunk_bytes // max(row_bytes, 1)), *row_shape),
                                                     dtype), 0]
        buf, at = st
        st[1] = at + n
        return buf[at:at + n]

    def _with_books_error(self, stats):
        if self._books_error is None or not isinstance(stats, dict):
            return stats
        return {**stats, "errors": [*stats.get("errors", []), self._books_error]}

    def _append_books(self) -> tuple[h5py.Group, int] | None:
        """The interventions' per-request ranges that changed since the last commit (see the
        layout above), appended: returns their group and the row count a reader may trust once
        the commit's phase 1 has flushed them, or None when nothing changed."""
        provider = self.books_provider
        try:
            changes = provider() if provider is not None else None
        except Exception as e:  # the ranges are worth less than the commit: keep committing, say so
            self.books_provider = None
            self._books_error = f"interventions' per-request ranges stopped at commit: {type(e).__name__}: {e}"
            log.error("dmi: %s", self._books_error)
            return None
        if not changes:
            return None
        f = self._require_open()
        g = f.get("books")
        if g is None:
            g = f.create_group("books")
            for name, dt in (("intervention", _STR), ("reason", _STR), ("request", np.int32), ("start", np.int64),
                             ("stop", np.int64), ("commit", np.int64)):
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(_GAP_CHUNK,))
        rows = [(name, why, rid, a, b) for name, why, rid, ranges in changes for a, b in ranges]
        req = self._map_requests([r[2] for r in rows])
        self._flush_requests()
        stop = _append_columns(g, {"intervention": np.array([r[0] for r in rows], dtype=object),
                                   "reason": np.array([r[1] for r in rows], dtype=object), "request": req,
                                   "start": np.array([r[3] for r in rows], dtype=np.int64),
                                   "stop": np.array([r[4] for r in rows], dtype=np.int64),
                                   "commit": np.full(len(rows), self._commits + 1, dtype=np.int64)})
        return g, stop

    def write_gaps(self, gaps: GapBlock) -> None:
        f = self._require_open()
        n = len(gaps.request)
        _check_lengths(gaps.hook, n, gaps.request, gaps.position, gaps.step)
        if n == 0:
            return
        req = self._map_requests(gaps.request)
        self._flush_requests()
        self._dirty = True
        _append_columns(f["gaps"], {
            "hook": np.full(n, gaps.hook, dtype=object),
            "request": req,
            "position": np.asarray(gaps.position, dtype=np.int64).reshape(n),
            "step": np.asarray(gaps.step, dtype=np.int64).reshape(n),
            "reason": np.full(n, gaps.reason, dtype=object),
        })

    # -- internals ---------------------------------------------------------------------------

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"HDF5Sink for {self.path!r} is not open")
        return self._file

    @staticmethod
    def _write_root_attrs(f: h5py.File, meta: RunMeta) -> None:
        a = f.attrs
        a["format"] = FORMAT
        a["format_version"] = FORMAT_VERSION
        a["dmi_version"] = str(meta.dmi_version)
        a["engine"] = str(meta.engine)
        a["model"] = str(meta.model)
        a["model_config"] = _dumps(meta.model_config)
        a["spec"] = meta.spec_json
        a["created"] = datetime.now(timezone.utc).isoformat()
        a["complete"] = False
        json_attrs = ["model_config", "spec"]
        for key, value in meta.extra.items():
            if _is_attr_scalar(value):
                a[key] = value
            else:
                a[key] = _dumps(value)
                json_attrs.append(key)
        # Tells readers which string attrs to parse, so a plain string extra is never mis-parsed.
        a["json_attrs"] = _dumps(json_attrs)

    def _create_hook(self, info: HookInfo, data: np.ndarray) -> _HookWriter:
        """Stage a new hook: checked now, written to the file at its first append."""
        self._require_open()
        name = info.name
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid hook name {name!r}: must be non-empty and contain no '/'")
        stored = _storage_dtype(info, data)
        row_shape = tuple(int(d) for d in data.shape[1:])
        if info.ragged and not row_shape:
            raise ValueError(f"hook {name!r} is ragged but its rows are scalars")
        inner = row_shape[:-1] if info.ragged else row_shape
        width = row_shape[-1] if info.ragged else 0
        hw = _HookWriter(info=info, group=None, data=None, request=None, position=None, step=None, dtype=stored,
                         inner_shape=inner, ragged=bool(info.ragged), width=width)
        self._staged[name] = hw
        return hw

    def _materialize(self, hw: _HookWriter, first_rows: int) -> None:
        """Create the hook's group and datasets, chunked for its first append of first_rows rows."""
        f = self._require_open()
        info, name, stored, inner, width = hw.info, hw.info.name, hw.dtype, hw.inner_shape, hw.width
        row_shape = (*inner, width) if hw.ragged else inner
        if info.ragged:
            # The last dim will grow towards the context length, so size chunks for a wider row
            # than the first one; otherwise late rows would each straddle many tiny chunks.
            # A first append smaller than a chunk is a short run (or a slow hook): its width is
            # near the final one, so size for it.
            grows = first_rows * int(np.prod(inner, dtype=np.int64)) * width * stored.itemsize >= self.chunk_bytes
            chunk_w = max(1, min(_next_pow2(max(width, 256) if grows else width), _MAX_CHUNK_W))
            chunk_inner = inner + (chunk_w,)
            maxshape = (None, *inner, None)
        else:
            chunk_inner = row_shape
            maxshape = (None, *row_shape)
        row_bytes = max(1, int(np.prod(chunk_inner, dtype=np.int64)) * stored.itemsize)
        full_rows = max(1, self.chunk_bytes // row_bytes)
        chunk_rows = min(full_rows, max(first_rows, _MIN_CHUNK_BYTES // row_bytes, 1))
        index_rows = min(_INDEX_CHUNK, max(_MIN_INDEX_CHUNK, first_rows))

        grp = f["hooks"].create_group(name)
        grp.attrs["dtype"] = info.dtype
        grp.attrs["row_shape"] = np.asarray(row_shape, dtype=np.int64)
        grp.attrs["ragged"] = bool(info.ragged)
        grp.attrs["source"] = info.source
        if info.shard is not None:
            grp.attrs["shard"] = np.asarray(info.shard, dtype=np.int64)
        ds = grp.create_dataset("data", shape=(0, *row_shape), maxshape=maxshape, dtype=stored,
                                chunks=(chunk_rows, *chunk_inner), fillvalue=np.zeros((), stored))
        cols = {c: grp.create_dataset(c, shape=(0,), maxshape=(None,), dtype=dt, chunks=(index_rows,))
                for c, dt in (("request", np.int32), ("position", np.int64), ("step", np.int64))}
        hw.group, hw.data = grp, ds
        hw.request, hw.position, hw.step = cols["request"], cols["position"], cols["step"]
        self._hooks[name] = self._staged.pop(name)

    @staticmethod
    def _conform(hw: _HookWriter, info: HookInfo, data: np.ndarray) -> np.ndarray:
        """Check a block against the hook's first block and return it in the stored dtype."""
        data = np.asarray(data)
        if info.dtype == "bfloat16" and data.dtype == np.int16:
            data = data.view(np.uint16)
        if data.dtype != hw.dtype:
            raise ValueError(f"hook {info.name!r}: block dtype {data.dtype} differs from the "
                             f"stored dtype {hw.dtype} (hook dtype {info.dtype!r})")
        shape = tuple(data.shape[1:])
        got = shape[:-1] if hw.ragged else shape
        if got != hw.inner_shape or (hw.ragged and len(shape) != len(hw.inner_shape) + 1):
            raise ValueError(f"hook {info.name!r}: block row shape {shape} does not match the "
                             f"first block's {hw.inner_shape + ((hw.width,) if hw.ragged else ())}")
        return data

    def _request_indices(self, block: RowBlock) -> np.ndarray:
        # Every block of a frame shares one id table: map each id of it once per frame (only the
        # ids rows use: the table also names requests the filters left out), then index.
        last = self._last_requests
        ids = block.request_ids
        if last is None or last[0] is not ids:
            last = self._last_requests = (ids, np.full(len(ids), -1, dtype=np.int32))
        table, idx = last[1], block.request_index
        out = table[idx]
        if (out < 0).any():  # ids this frame's table has not mapped yet
            missing = np.unique(idx[out < 0])
            table[missing] = self._map_requests([ids[j] for j in missing.tolist()])
            out = table[idx]
        return out

    def _map_requests(self, requests: list[str]) -> np.ndarray:
        index = self._request_index
        out = np.empty(len(requests), dtype=np.int32)
        for i, rid in enumerate(requests):
            j = index.get(rid)
            if j is None:
                j = index[rid] = len(index)
                self._pending_requests.append(rid)
            out[i] = j
        return out

    def _flush_requests(self) -> None:
        # Request ids must reach the file before any row that points at them.
        if not self._pending_requests:
            return
        ds = self._require_open()["requests"]
        start = ds.shape[0]
        new = self._pending_requests
        ds.resize((start + len(new),))
        ds[start:] = np.array(new, dtype=object)
        self._pending_requests = []
        self._dirty = True

    def _flush_buffers(self) -> None:
        self._flush_requests()
        for hw in [*self._hooks.values(), *self._staged.values()]:
            self._append(hw)
        for hw in self._hooks.values():
            self._write_index(hw)

    @staticmethod
    def _write_index(hw: _HookWriter) -> None:
        if not hw.index_parts:
            return
        parts, hw.index_parts = hw.index_parts, []
        start, stop = hw.indexed, hw.indexed + sum(len(p[0]) for p in parts)
        for k, ds in enumerate((hw.request, hw.position, hw.step)):
            h5append.grow(ds, stop)
            h5append.put(ds, start, parts[0][k] if len(parts) == 1 else np.concatenate([p[k] for p in parts]))
        hw.indexed = stop

    def _append(self, hw: _HookWriter) -> None:
        """Write the hook's buffered blocks as one append: one resize, each block written into
        its slice straight from the drain's host copy (no concatenation copy)."""
        if not hw.parts:
            return
        parts, hw.parts, hw.buffered_bytes = hw.parts, [], 0
        self._write_rows(hw, [p[0] for p in parts], np.concatenate([p[1] for p in parts]),
                         np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))

    def _write_rows(self, hw: _HookWriter, datas: list[np.ndarray], req: np.ndarray,
                    pos: np.ndarray, step: np.ndarray) -> None:
        nbytes = sum(d.nbytes for d in datas)
        self._ensure_room(nbytes + 20 * len(req))
        self._flush_requests()
        n = len(req)
        if hw.data is None:
            if hw.ragged:
                hw.width = max(hw.width, max(int(d.shape[-1]) for d in datas))
            self._materialize(hw, n)
        start, stop = hw.rows, hw.rows + n
        if hw.ragged:
            w = max(d.shape[-1] for d in datas)
            if w > hw.width:
                hw.width = w
                hw.data.resize((stop, *hw.inner_shape, w))
                hw.group.attrs["row_shape"] = np.asarray((*hw.inner_shape, w), dtype=np.int64)
            else:
                hw.data.resize(stop, axis=0)
        else:
            h5append.grow(hw.data, stop)
        self._dirty = True
        at = start
        for d in datas if hw.ragged else _coalesce(datas):
            k = d.shape[0]
            if hw.ragged:
                # Narrower rows leave the tail at the fill value 0, which is the padding we want.
                hw.data[at:at + k, ..., :d.shape[-1]] = d
            else:
                h5append.put(hw.data, at, d)
            at += k
        hw.index_parts.append((req, pos, step))
        hw.rows = stop
        self.pages.wrote(nbytes)


# Bytes kept free for closing a file whose disk is full (stats, attributes, metadata flush).
_CLOSE_RESERVE = 1 << 20

# Upper bound for the ragged chunk width: keeps a chunk of one row at a sane size for long contexts.
_MAX_CHUNK_W = 1 << 14


def _coalesce(datas: list[np.ndarray]) -> list[np.ndarray]:
    """Merge blocks that are adjacent slices of one staging buffer (see staging()) into one
    view, so they are written with one call."""
    out: list[np.ndarray] = []
    for d in datas:
        if out and _adjacent(out[-1], d):
            p = out[-1]
            base = _owner(d)
            at = _address(p) - _address(base)
            rows = base.view(np.uint8).reshape(-1)[at:at + p.nbytes + d.nbytes]
            out[-1] = rows.view(p.dtype).reshape(len(p) + len(d), *p.shape[1:])
            continue
        out.append(d)
    return out


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _adjacent(p: np.ndarray, d: np.ndarray) -> bool:
    base = _owner(d)
    return (base is not d and _owner(p) is base and base.flags.c_contiguous and p.flags.c_contiguous
            and d.flags.c_contiguous and p.dtype == d.dtype and p.shape[1:] == d.shape[1:]
            and _address(d) == _address(p) + p.nbytes)


def _append_columns(group: h5py.Group, columns: dict[str, np.ndarray]) -> int:
    """Append equal-length columns to a group's resizable datasets; returns the new length."""
    start = group[next(iter(columns))].shape[0]
    stop = start + len(next(iter(columns.values())))
    for name, values in columns.items():
        ds = group[name]
        ds.resize((stop,))
        ds[start:] = values
    return stop


def _without_ranges(stats: dict | None) -> dict | None:
    """stats with the interventions' per-request ranges left out (they are in /books)."""
    ivs = (stats or {}).get("interventions")
    if not isinstance(ivs, dict):
        return stats
    keep = {k: {f: v for f, v in e.items() if f not in ("requests", "failed")} if isinstance(e, dict) else e
            for k, e in ivs.items()}
    return {**stats, "interventions": keep}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _storage_dtype(info: HookInfo, data: np.ndarray) -> np.dtype:
    if info.dtype == "bfloat16":
        if data.dtype not in (np.uint16, np.int16):
            raise ValueError(f"hook {info.name!r} is bfloat16 but its data is {data.dtype}; "
                             "expected uint16 bit patterns")
        return np.dtype(np.uint16)
    try:
        declared = np.dtype(info.dtype)
    except TypeError:
        # A torch dtype numpy lacks (float8 variants, ...): the producer hands us bit patterns.
        return data.dtype
    if declared != data.dtype:
        raise ValueError(f"hook {info.name!r} declares dtype {info.dtype!r} but its data is {data.dtype}")
    return data.dtype


def _check_lengths(hook: str, n: int, request, position: np.ndarray, step: np.ndarray) -> None:
    lens = (len(request), int(np.size(position)), int(np.size(step)))
    if lens != (n, n, n):
        raise ValueError(f"hook {hook!r}: {n} rows but {lens[0]} request ids, "
                         f"{lens[1]} positions and {lens[2]} steps")
