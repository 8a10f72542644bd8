"""Dataset sink: sharded Parquet plus a manifest per writer, through fsspec (a local folder or
object storage such as s3://bucket/run), for training pipelines and distributed readers.

Layout under the root (format "dmi-dataset", format_version 1):

    <hook>/rank<RRRRR>-<NNNNNN>.parquet   one hook's rows; columns request (string), position,
                                          step (int64), data (the row flattened: fixed-size list,
                                          or a list plus `width` for ragged hooks); the schema
                                          metadata "dmi" holds hook, dtype, row_shape, ragged
    _gaps/rank<RRRRR>-<NNNNNN>.parquet    dropped rows: hook, request, position, step, reason
    _manifest.rank<RRRRR>.json            this writer's run metadata, shard list, requests, stats

Why these choices (docs/decisions.md has the measurement): Parquet is what `datasets`,
PyArrow, Ray Data and Spark read natively; one folder per hook gives every shard one schema.
Names starting with "_" are skipped by PyArrow's and Ray's directory discovery.

Each writer (rank, server, process) writes only its own shards and its own manifest, so
writers never coordinate; `rank` comes from the sink spec, else $DMI_RANK or $RANK, else 0.

Crash safety: a shard is built whole in memory and then published in one step (a local
file is written under a temporary name and renamed; an object is PUT only when complete),
and the manifest, rewritten the same way after every shard, lists only published shards. A
crash loses the rows buffered since the last shard, never a shard's consistency.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta, Sink, block_rows
from dmi.sinks.pagecache import PageRelease, release_file
from dmi.sinks.parquet_rows import RowsParquetWriter

FORMAT = "dmi-dataset"
# The newest format this dmi writes and reads. 2 adds value_encoding "bytes"; a dataset without
# it is written as 1, so a dmi that reads only 1 still reads it.
FORMAT_VERSION = 2
# Parquet is the default (docs/decisions.md); safetensors shards (one file per hook shard:
# data, request_index, position, step, width; ids and hook metadata in the header) are what
# `dmi export --to safetensors` writes, for tools that load tensors directly.
SHARD_FORMATS = ("parquet", "safetensors")
# How a Parquet shard stores a row's values (docs/decisions.md, "dataset sink throughput"):
# "list": a fixed-size list column, which every reader (datasets, PyArrow, Ray) shows as an
# array; "bytes": a fixed-size binary column holding the row's raw little-endian bytes (dtype
# and row shape in the schema's "dmi" metadata; `decode_rows` turns them into an array). Both
# write at about the speed of a copy ("list" through dmi's own writer, parquet_rows.py; Arrow's
# encodes a list value by value at half that); "bytes" reads back as a zero-copy view. Ragged
# hooks are always lists.
VALUE_ENCODINGS = ("list", "bytes")
MANIFEST_PREFIX = "_manifest.rank"
GAPS_DIR = "_gaps"


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank:05d}.json"


def default_rank() -> int:
    for var in ("DMI_RANK", "RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return 0


def filesystem(path: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, root path without protocol) for a local folder or a URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs, root.rstrip("/")


def arrow_type(dtype: np.dtype):
    import pyarrow as pa

    return pa.from_numpy_dtype(dtype)


@dataclass
class _Hook:
    info: HookInfo
    dtype: np.dtype
    row_shape: tuple[int, ...]
    # Blocks as handed over by the drain (kept, not copied): data, request ids (an Arrow
    # string array), position, step.
    parts: list[tuple[np.ndarray, Any, np.ndarray, np.ndarray]] = field(default_factory=list)
    buffered: int = 0
    seq: int = 0
    # The Parquet shard being written (row group by row group), published when it is closed.
    writer: Any = None
    out: Any = None          # the open temporary file, or an in-memory stream for object storage
    tmp: str | None = None
    shard_rows: int = 0
    shard_bytes: int = 0
    pending: Any = None      # the future of its last row group handed to the encoder threads
    pages: Any = None        # the open local shard's PageRelease (dmi.sinks.pagecache)


# Rows are buffered per hook (by reference: a RowBlock is handed over) up to a row group of
# ROW_GROUP_BYTES, written as one row group whose columns are zero-copy views of the blocks.
# Fewer, larger row groups cost less per byte than one per drained block
# (docs/decisions.md, "dataset sink throughput").
ROW_GROUP_BYTES = 8 << 20
# Parquet's writer computes levels and encodes values in batches of this many; its default
# (1024) costs a call per 1024 floats, which shows at rows of many KiB.
WRITE_BATCH = 1 << 16


class DatasetSink(Sink):
    def __init__(self, path: str, rank: int | None = None, shard_bytes: int = 128 << 20,
                 overwrite: bool = False, storage_options: dict[str, Any] | None = None,
                 compression: str | None = None, flush_every_s: float | None = None,
                 shard_format: str = "parquet", encode_threads: int | None = None,
                 value_encoding: str = "list", release_pages: bool = True) -> None:
        if not isinstance(path, str) or not path:
            raise _error("sink.path", f"a dataset sink needs a folder or URL, got {path!r}")
        if shard_bytes <= 0:
            raise _error("sink.shard_bytes", f"must be positive, got {shard_bytes}")
        self.path = path
        self.rank = default_rank() if rank is None else int(rank)
        if self.rank < 0:
            raise _error("sink.rank", f"must be >= 0, got {rank}")
        self.shard_bytes = int(shard_bytes)
        if shard_format not in SHARD_FORMATS:
            raise _error("sink.shard_format", f"must be one of {', '.join(SHARD_FORMATS)}, got {shard_format!r}")
        self.shard_format = shard_format
        if value_encoding not in VALUE_ENCODINGS:
            raise _error("sink.value_encoding", f"must be one of {', '.join(VALUE_ENCODINGS)}, got {value_encoding!r}")
        self.value_encoding = value_encoding
        if encode_threads is None:
            encode_threads = min(4, os.cpu_count() or 1)
        if isinstance(encode_threads, bool) or not isinstance(encode_threads, int) or encode_threads < 0:
            raise _error("sink.encode_threads", f"must be a number of threads >= 0 (0: encode on the sink thread), "
                                                f"got {encode_threads!r}")
        self.encode_threads = encode_threads
        self.release_pages = bool(release_pages)  # written pages go back to the kernel once on disk
        self._pool = None
        self._inflight: list = []
        self.overwrite = bool(overwrite)
        self.storage_options = dict(storage_options or {})
        self.compression = compression or "none"
        self.flush_every_s = flush_every_s
        self.fs, self.root = filesystem(path, self.storage_options)
        self.local = "file" in _protocols(self.fs)
        self._meta: dict[str, Any] | None = None
        self._hooks: dict[str, _Hook] = {}
        self._shards: list[dict[str, Any]] = []
        self._requests: dict[str, None] = {}
        self._ids: tuple[list[str], Any, np.ndarray] | None = None
        self._gaps: list[tuple[str, list[str], np.ndarray, np.ndarray, str]] = []
        self._gap_seq = 0
        self._last_flush = time.monotonic()
        self.bytes_published = 0

    # -- attach-time check -------------------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse, before anything is created, to overwrite this rank's earlier run."""
        from dmi.errors import SinkPathError

        manifest = self._join(manifest_name(self.rank))
        try:
            if self.fs.exists(manifest) and not self.overwrite:
                raise SinkPathError(f"the dataset {self.path!r} already holds a run of rank {self.rank} "
                                    f"({manifest!r}); choose another path or set overwrite: true in the spec")
            if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
                raise SinkPathError(f"cannot write dataset {self.path!r}: it is an existing file, not a folder")
        except SinkPathError:
            raise
        except Exception as e:  # unreachable endpoint, bad credentials: say so at attach
            raise SinkPathError(f"cannot reach dataset {self.path!r}: {type(e).__name__}: {e}") from e

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, meta: RunMeta) -> None:
        self.check_writable()
        if self.overwrite:
            self._remove_own()
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        self._meta = {"dmi_version": meta.dmi_version, "engine": meta.engine, "model": meta.model,
                      "model_config": meta.model_config, "spec": json.loads(meta.spec_json) if meta.spec_json else {},
                      "created": datetime.now(timezone.utc).isoformat(), **meta.extra}
        self._write_manifest(complete=False, stats=None)

    def write(self, block: RowBlock) -> None:
        data = np.asarray(block.data)
        n = block_rows(block)
        if n:
            h = self._hooks.get(block.hook.name)
            if h is None:
                h = self._hooks[block.hook.name] = self._new_hook(block.hook, data)
            if data.dtype != h.dtype:
                if block.hook.dtype == "bfloat16" and data.dtype == np.int16:
                    data = data.view(np.uint16)
                else:
                    raise ValueError(f"hook {block.hook.name!r}: block dtype {data.dtype} differs from the first "
                                     f"block's {h.dtype}")
            if not h.info.ragged and tuple(data.shape[1:]) != h.row_shape:
                raise ValueError(f"hook {block.hook.name!r}: row shape {tuple(data.shape[1:])} differs from the "
                                 f"first block's {h.row_shape}")
            requests = self._request_strings(block)
            pos = np.asarray(block.position, dtype=np.int64).reshape(n)
            step = np.asarray(block.step, dtype=np.int64).reshape(n)
            h.parts.append((data, requests, pos, step))
            h.buffered += data.nbytes
            if self.shard_format == "parquet":
                if h.buffered >= min(ROW_GROUP_BYTES, self.shard_bytes):
                    self._row_group(h)
            elif h.buffered >= self.shard_bytes:
                self._publish(h)
        if self.flush_every_s is not None and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def write_gaps(self, gaps: GapBlock) -> None:
        if gaps.request:
            for r in gaps.request:
                if r not in self._requests:
                    self._requests[r] = None
            self._gaps.append((gaps.hook, list(gaps.request), np.asarray(gaps.position, np.int64).reshape(-1).copy(),
                               np.asarray(gaps.step, np.int64).reshape(-1).copy(), gaps.reason))

    def flush(self) -> None:
        """Publish every hook's buffered rows as a (possibly short) shard, then the manifest."""
        for h in self._hooks.values():
            self._publish(h)
        self._publish_gaps()
        self._write_manifest(complete=False, stats=None)
        self._last_flush = time.monotonic()

    def close(self, stats: dict[str, Any], complete: bool = True) -> None:
        if self._meta is None:
            return
        error: BaseException | None = None
        # Each hook on its own: one whose shard failed loses its unpublished rows, the others not.
        for h in self._hooks.values():
            try:
                self._publish(h)
            except BaseException as e:
                error = error or e
                self._discard_shard(h)   # no half-written shard is left behind
        try:
            self._publish_gaps()
        except BaseException as e:
            error = error or e
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._inflight = None, []
        self._write_manifest(complete=bool(complete) and error is None, stats=stats or {})
        self._meta = None
        if error is not None:
            raise error

    # -- internals ---------------------------------------------------------------------------

    def _join(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _request_strings(self, block: RowBlock):
        """The block's request id per row as an Arrow string array, taken from the frame's id
        table (converted once per frame: every block of a frame shares it); the ids rows use
        join the manifest's request list."""
        import pyarrow as pa

        ids = block.request_ids
        cached = self._ids
        if cached is None or cached[0] is not ids:
            cached = self._ids = (ids, pa.array(ids, pa.string()), np.zeros(len(ids), bool))
        seen, index = cached[2], block.request_index
        for j in np.unique(index[~seen[index]]).tolist():
            self._requests.setdefault(ids[j], None)
            seen[j] = True
        return cached[1].take(pa.array(index, pa.int32()))

    def _new_hook(self, info: HookInfo, data: np.ndarray) -> _Hook:
        if not info.name or "/" in info.name or info.name.startswith(("_", ".")):
            raise ValueError(f"invalid hook name {info.name!r} for a dataset: it names a folder")
        dtype = np.dtype(np.uint16) if info.dtype == "bfloat16" else data.dtype
        return _Hook(info=info, dtype=dtype, row_shape=tuple(int(d) for d in data.shape[1:]))

    def _row_group(self, h: _Hook) -> None:
        """Append the buffered rows to the hook's open Parquet shard as one row group; publish
        the shard once it holds shard_bytes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not h.parts:
            return
        parts, h.parts, h.buffered = h.parts, [], 0
        table = rows_table(h.info, h.dtype, [p[0] for p in parts], pa.chunked_array([p[1] for p in parts]),
                           np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                           self.value_encoding)
        if h.writer is None:
            h.tmp = None
            if self.local:
                final = self._join(f"{h.info.name}/rank{self.rank:05d}-{h.seq:06d}.parquet")
                os.makedirs(os.path.dirname(final), exist_ok=True)
                h.tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp")
                # Arrow's own file, not a Python one: every page write would otherwise cross
                # into Python and take the GIL.
                h.out = pa.OSFile(h.tmp, "wb")
                h.pages = PageRelease(h.out.fileno, enabled=self.release_pages)
            else:
                h.out = pa.BufferOutputStream()
            if RowsParquetWriter.takes(table.schema, self.compression):
                h.writer = RowsParquetWriter(h.out, table.schema)
            else:
                h.writer = pq.ParquetWriter(h.out, table.schema, **_PARQUET_OPTIONS, compression=self.compression)
        self._encode(h, table)
        if h.pages is not None:
            h.pages.wrote(int(table.nbytes))
        h.shard_rows += table.num_rows
        h.shard_bytes += int(table.nbytes)
        if h.shard_bytes >= self.shard_bytes:
            self._finish_shard(h)
            self._write_manifest(complete=False, stats=None)

    def _encode(self, h: _Hook, table) -> None:
        """Write a row group into the hook's shard. With encode_threads, on a pool: writing
        (and, for what Arrow's writer encodes, encoding) runs with the GIL released, so one
        hook's row group is written while the sink thread takes the next blocks; one hook's row
        groups stay in order (each waits for the one before). At most 2 per thread are in
        flight, which bounds the rows held in memory."""
        if not self.encode_threads:
            h.writer.write_table(table, row_group_size=1 << 30)
            return
        from concurrent.futures import ThreadPoolExecutor, wait

        if h.pending is not None and h.pending.done() and h.pending.exception() is not None:
            raise h.pending.exception()   # the hook's shard is broken: these rows are not taken
        while len(self._inflight) >= 2 * self.encode_threads:
            wait([self._inflight.pop(0)])  # its error, if any, is its own hook's (raised there)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="dmi-dataset-encode")
        # FIFO pool: `before` was queued earlier, so it runs or has run before this task waits on it.
        h.pending = self._pool.submit(_write_row_group, h.writer, table, h.pending)
        self._inflight.append(h.pending)

    def _settle(self, h: _Hook) -> None:
        """Wait for the hook's row groups to be encoded; raise what encoding raised."""
        pending, h.pending = h.pending, None
        if pending is not None:
            pending.result()

    def _finish_shard(self, h: _Hook) -> None:
        if h.writer is None:
            return
        try:
            self._settle(h)
        except BaseException:
            self._discard_shard(h)
            raise
        name = f"{h.info.name}/rank{self.rank:05d}-{h.seq:06d}.parquet"
        writer, out, tmp, rows = h.writer, h.out, h.tmp, h.shard_rows
        h.writer = h.out = h.tmp = h.pages = None
        h.shard_rows = h.shard_bytes = 0
        h.seq += 1
        writer.close()
        if tmp is not None:
            out.close()
            final = self._join(name)
            os.replace(tmp, final)
            release_file(final, self.release_pages)
            nbytes = os.path.getsize(final)
            self.bytes_published += nbytes
        else:
            nbytes = self._put(name, out.getvalue().to_pybytes())   # boto wants bytes
        self._shards.append({"path": name, "hook": h.info.name, "rows": rows, "bytes": nbytes})

    def _discard_shard(self, h: _Hook) -> None:
        """Drop the hook's unpublished shard (its encoding failed, or the sink is closing after
        a failure): the temporary file goes, nothing of it is ever listed."""
        if h.writer is None:
            return
        try:
            self._settle(h)
        except BaseException:  # noqa: BLE001  (already reported by whoever settled it first)
            pass
        writer, out, tmp = h.writer, h.out, h.tmp
        h.writer = h.out = h.tmp = h.pages = None
        h.shard_rows = h.shard_bytes = 0
        for fn in (writer.close, out.close):
            try:
                fn()
            except Exception:  # noqa: BLE001  (a broken stream cannot be closed cleanly; the file goes anyway)
                pass
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)

    def _publish(self, h: _Hook) -> None:
        """Everything of the hook not yet published becomes (part of) a complete shard."""
        if self.shard_format == "parquet":
            self._row_group(h)
            self._finish_shard(h)
            return
        if not h.parts:
            return
        parts, h.parts, h.buffered = h.parts, [], 0
        datas, ids = [p[0] for p in parts], [r for p in parts for r in p[1].to_pylist()]
        pos, step = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
        name = f"{h.info.name}/rank{self.rank:05d}-{h.seq:06d}.{self.shard_format}"
        h.seq += 1
        nbytes = self._put(name, safetensors_bytes(h.info, h.dtype, datas, ids, pos, step))
        self._shards.append({"path": name, "hook": h.info.name, "rows": len(ids), "bytes": nbytes})

    def _publish_gaps(self) -> None:
        if not self._gaps:
            return
        import pyarrow as pa

        gaps, self._gaps = self._gaps, []
        table = pa.table({
            "hook": pa.array([g[0] for g in gaps for _ in g[1]], pa.string()),
            "request": pa.array([r for g in gaps for r in g[1]], pa.string()),
            "position": pa.array(np.concatenate([g[2] for g in gaps]), pa.int64()),
            "step": pa.array(np.concatenate([g[3] for g in gaps]), pa.int64()),
            "reason": pa.array([g[4] for g in gaps for _ in g[1]], pa.string()),
        })
        name = f"{GAPS_DIR}/rank{self.rank:05d}-{self._gap_seq:06d}.parquet"
        self._gap_seq += 1
        self._put(name, lambda out: _write_parquet(table, out, self.compression))
        self._shards.append({"path": name, "hook": None, "rows": table.num_rows, "gaps": True})

    def _put(self, name: str, payload) -> int:
        """Publish a whole object: locally a temporary file renamed over the final name (atomic
        on POSIX), elsewhere one PUT of the complete bytes. `payload` is bytes, or a function
        that writes the object to a binary stream (saves a copy of the shard)."""
        path = self._join(name)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(payload) if not callable(payload) else payload(f)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            nbytes = os.path.getsize(path)
        else:
            if callable(payload):
                import pyarrow as pa

                out = pa.BufferOutputStream()
                payload(out)
                payload = out.getvalue().to_pybytes()   # boto wants bytes
            self.fs.pipe_file(path, payload)
            nbytes = len(payload)
        self.bytes_published += nbytes
        return nbytes

    def _write_manifest(self, complete: bool, stats: dict[str, Any] | None) -> None:
        from dmi.sinks.hdf5 import json_default

        doc = {"format": FORMAT, "format_version": _version(self.value_encoding), "rank": self.rank, "shard_format": self.shard_format,
               "complete": complete, "written_at": datetime.now(timezone.utc).isoformat(),
               "meta": self._meta or {},
               "hooks": {name: {"dtype": h.info.dtype, "row_shape": list(h.row_shape), "ragged": bool(h.info.ragged),
                                "source": h.info.source, "shard": list(h.info.shard) if h.info.shard else None,
                                "encoding": _encoding(h.info, self.value_encoding, self.shard_format)}
                         for name, h in self._hooks.items()},
               "requests": list(self._requests),
               "shards": list(self._shards)}
        if stats is not None:
            doc["stats"] = stats
        self._put(manifest_name(self.rank), json.dumps(doc, default=json_default).encode())

    def _remove_own(self) -> None:
        """overwrite: true removes this rank's earlier manifest and shards (other ranks' stay)."""
        prefix = f"rank{self.rank:05d}-"
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return
        for p in found:
            base = p.rsplit("/", 1)[-1]
            if base == manifest_name(self.rank) or (base.startswith(prefix) and base.endswith(SHARD_FORMATS)):
                self.fs.rm_file(p)


def _version(value_encoding: str) -> int:
    return 2 if value_encoding == "bytes" else 1


def _encoding(info: HookInfo, value_encoding: str, shard_format: str = "parquet") -> str:
    if shard_format != "parquet":
        return "tensor"
    return "list" if info.ragged else value_encoding


def rows_table(info: HookInfo, dtype: np.dtype, datas: list[np.ndarray], requests, position: np.ndarray,
               step: np.ndarray, value_encoding: str = "list"):
    """One Arrow table of rows: request, position, step, data (+ width for ragged hooks).

    Every column is declared non-null (none ever is): Parquet then stores no definition levels
    for the row values, which is most of what encoding a list column costs beyond the bytes."""
    import pyarrow as pa

    value = pa.field("item", arrow_type(dtype), nullable=False)
    if info.ragged:
        widths = np.concatenate([np.full(len(d), d.shape[-1], np.int32) for d in datas])
        flat = [d.reshape(len(d), -1) for d in datas]
        lengths = np.concatenate([np.full(len(d), d.shape[1], np.int64) for d in flat])
        offsets = np.zeros(len(lengths) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate([f.reshape(-1) for f in flat]).astype(dtype, copy=False)
        data_type = pa.list_(value)
        col = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value.type), type=data_type)
        extra = {"width": pa.array(widths, pa.int32())}
        row_shape = [int(d) for d in datas[0].shape[1:-1]] + [int(max(d.shape[-1] for d in datas))]
    else:
        # One Arrow chunk per block, each a zero-copy view of the block: no concatenation.
        per_row = int(np.prod(datas[0].shape[1:], dtype=np.int64))
        blocks = [np.ascontiguousarray(d).astype(dtype, copy=False) for d in datas]
        if value_encoding == "bytes":
            data_type = pa.binary(per_row * np.dtype(dtype).itemsize)
            col = pa.chunked_array([pa.FixedSizeBinaryArray.from_buffers(data_type, len(d), [None, pa.py_buffer(d)])
                                    for d in blocks], type=data_type)
        else:
            data_type = pa.list_(value, per_row)
            col = pa.chunked_array([pa.FixedSizeListArray.from_arrays(pa.array(d.reshape(-1), value.type),
                                                                      type=data_type) for d in blocks], type=data_type)
        extra = {}
        row_shape = [int(d) for d in datas[0].shape[1:]]
    meta = {"hook": info.name, "dtype": info.dtype, "row_shape": row_shape, "ragged": bool(info.ragged),
            "source": info.source, "format": FORMAT, "format_version": _version(value_encoding),
            "encoding": _encoding(info, value_encoding)}
    columns = {"request": (requests if isinstance(requests, (pa.Array, pa.ChunkedArray))
                           else pa.array(requests, pa.string())),
               "position": pa.array(position, pa.int64()), "step": pa.array(step, pa.int64()), "data": col, **extra}
    schema = pa.schema([pa.field(k, v.type, nullable=False) for k, v in columns.items()],
                       metadata={"dmi": json.dumps(meta)})
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def safetensors_bytes(info: HookInfo, dtype: np.dtype, datas: list[np.ndarray], requests: list[str],
                      position: np.ndarray, step: np.ndarray) -> bytes:
    """One safetensors shard: data [n, *row] (ragged rows zero-padded, their widths in `width`),
    request_index into the header's request list, position, step."""
    import torch
    from safetensors.torch import save

    if info.ragged:
        w = max(d.shape[-1] for d in datas)
        width = np.concatenate([np.full(len(d), d.shape[-1], np.int32) for d in datas])
        data = np.zeros((sum(len(d) for d in datas), *datas[0].shape[1:-1], w), dtype)
        i = 0
        for d in datas:
            data[i:i + len(d), ..., : d.shape[-1]] = d
            i += len(d)
    else:
        data = datas[0] if len(datas) == 1 else np.concatenate(datas)
        width = None
    t = torch.from_numpy(np.ascontiguousarray(data))
    if info.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    ids = list(dict.fromkeys(requests))
    index = {r: i for i, r in enumerate(ids)}
    tensors = {"data": t, "request_index": torch.tensor([index[r] for r in requests], dtype=torch.int32),
               "position": torch.from_numpy(np.ascontiguousarray(position, np.int64)),
               "step": torch.from_numpy(np.ascontiguousarray(step, np.int64))}
    if width is not None:
        tensors["width"] = torch.from_numpy(width)
    meta = {"hook": info.name, "dtype": info.dtype, "row_shape": [int(d) for d in data.shape[1:]],
            "ragged": bool(info.ragged), "source": info.source, "format": FORMAT, "format_version": 1}
    return save(tensors, metadata={"dmi": json.dumps(meta), "requests": json.dumps(ids)})


# Activations barely compress (float mantissas): "none" keeps the writer near memory speed;
# a dictionary is tried only where it pays (request ids), never on the values; no
# statistics (nobody filters on a float's min/max).
_PARQUET_OPTIONS = {"use_dictionary": ["request"], "write_statistics": False, "write_batch_size": WRITE_BATCH}


def _write_parquet(table, out, compression: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, out, compression=compression, row_group_size=1 << 20, **_PARQUET_OPTIONS)


def _write_row_group(writer, table, before) -> None:
    if before is not None:
        before.result()   # raises what the hook's previous row group raised: this one is not written
    writer.write_table(table, row_group_size=1 << 30)


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _error(field_name: str, message: str):
    from dmi.errors import SpecError

    return SpecError(field_name, message)
