"""A Parquet writer for the dataset sink's row tables, at the speed of a copy.

Why dmi writes these files itself (docs/decisions.md, "dataset sink throughput"): Arrow's
Parquet writer encodes a fixed-size list value by value, computing and run-length encoding a
repetition and a definition level for every float. That caps it near 0.5 GB per CPU-second,
about half of what the HDF5 sink appends. For dmi's rows the levels are known in closed form
(every row is a non-null list of exactly `width` non-null values), so one page of k rows has
definition levels "k*width ones" (one run) and repetition levels "0, then width-1 ones" per row
(two runs a row), and its values are the rows' bytes unchanged (PLAIN). Writing those bytes and a
few hundred bytes of Thrift headers is all a page needs.

The file is standard Parquet (data page v1, PLAIN values, RLE levels, uncompressed) with the
Arrow schema stored under "ARROW:schema" the way Arrow itself stores it, so PyArrow, `datasets`,
Ray Data and any other Parquet reader see the same schema and values as from Arrow's writer.
Tables this writer cannot take (ragged rows, compression, other dtypes) keep Arrow's writer:
`RowsParquetWriter.takes(schema, compression)` says which.
"""
from __future__ import annotations

import base64

import numpy as np

PAGE_BYTES = 1 << 20

# Parquet's enums (parquet.thrift).
_BYTE_ARRAY, _INT32, _INT64, _FLOAT, _DOUBLE = 6, 1, 2, 4, 5
_REQUIRED, _REPEATED = 0, 2
_PLAIN, _RLE = 0, 3
_UTF8, _LIST = 0, 3
# Thrift compact protocol's type codes.
_T_TRUE, _T_FALSE, _T_BYTE, _T_I32, _T_I64, _T_BINARY, _T_LIST, _T_STRUCT = 1, 2, 3, 5, 6, 8, 9, 12

# numpy dtype of a value -> (Parquet physical type, the dtype its values are stored as,
# (bit width, signed) of an INT logical type or None). Narrow ints are stored as int32, as Arrow does.
_VALUE_TYPES = {
    np.dtype(np.float32): (_FLOAT, np.dtype("<f4"), None),
    np.dtype(np.float64): (_DOUBLE, np.dtype("<f8"), None),
    np.dtype(np.int32): (_INT32, np.dtype("<i4"), None),
    np.dtype(np.int64): (_INT64, np.dtype("<i8"), None),
    np.dtype(np.uint16): (_INT32, np.dtype("<i4"), (16, False)),   # bfloat16 rows
    np.dtype(np.int16): (_INT32, np.dtype("<i4"), (16, True)),
    np.dtype(np.uint8): (_INT32, np.dtype("<i4"), (8, False)),
    np.dtype(np.int8): (_INT32, np.dtype("<i4"), (8, True)),
}
_CONVERTED_INT = {(16, False): 12, (16, True): 16, (8, False): 11, (8, True): 15}


class RowsParquetWriter:
    """Streams row groups of one schema into a Parquet file: `write_table` per row group,
    `close` writes the footer (the file is readable only then, which the sink relies on: a
    shard is published after close). Same calls as `pyarrow.parquet.ParquetWriter`."""

    @staticmethod
    def takes(schema, compression: str) -> bool:
        import pyarrow as pa

        if compression not in (None, "none") or [f.name for f in schema] != ["request", "position", "step", "data"]:
            return False
        data = schema.field("data").type
        return (pa.types.is_fixed_size_list(data) and data.list_size > 0
                and not data.value_field.nullable and schema.field("request").type == pa.string()
                and np.dtype(data.value_type.to_pandas_dtype()) in _VALUE_TYPES)

    def __init__(self, out, schema) -> None:
        self.out, self.schema = out, schema
        self.width = schema.field("data").type.list_size
        self.value_type, self.store_dtype, self.int_logical = _VALUE_TYPES[
            np.dtype(schema.field("data").type.value_type.to_pandas_dtype())]
        self.row_groups: list[bytes] = []
        self.num_rows = 0
        self.pos = 0
        self._write(b"PAR1")

    def write_table(self, table, row_group_size: int | None = None) -> None:   # noqa: ARG002 (one group a call)
        if table.schema != self.schema:
            raise ValueError(f"table schema {table.schema} differs from the file's {self.schema}")
        n = table.num_rows
        if n == 0:
            return
        start = self.pos
        chunks = [self._flat_chunk("request", _BYTE_ARRAY, _plain_strings(table.column("request").combine_chunks()), n),
                  self._flat_chunk("position", _INT64, _int64(table.column("position")), n),
                  self._flat_chunk("step", _INT64, _int64(table.column("step")), n),
                  self._data_chunk(table.column("data").chunks)]
        self.row_groups.append(_struct([(1, "list_struct", chunks), (2, "i64", self.pos - start),
                                        (3, "i64", n), (5, "i64", start), (6, "i64", self.pos - start)]))
        self.num_rows += n

    def close(self) -> None:
        meta = _struct([
            (1, "i32", 1),
            (2, "list_struct", self._schema_elements()),
            (3, "i64", self.num_rows),
            (4, "list_struct", self.row_groups),
            (5, "list_struct", self._key_values()),
            (6, "bin", b"dmi parquet_rows writer"),
        ])
        self._write(meta)
        self._write(len(meta).to_bytes(4, "little") + b"PAR1")

    # -- pages ---------------------------------------------------------------------------------

    def _write(self, buf) -> None:
        self.out.write(buf)
        self.pos += memoryview(buf).nbytes

    def _flat_chunk(self, name: str, ptype: int, body: bytes, n: int) -> bytes:
        """One required flat column: one PLAIN page, no levels (max levels are 0)."""
        start = self.pos
        self._write(_page_header(len(body), n))
        self._write(body)
        return _column_chunk(ptype, [_PLAIN], [name], n, start, self.pos - start)

    def _data_chunk(self, chunks) -> bytes:
        """The row values: pages of whole rows, about PAGE_BYTES each. A page may span the
        table's chunks (one per drained block): its rows are written chunk by chunk, never
        concatenated."""
        w = self.width
        per_page = max(1, PAGE_BYTES // (w * self.store_dtype.itemsize))
        rep_row = b"\x02\x00" + (_varint((w - 1) << 1) + b"\x01" if w > 1 else b"")
        start, values = self.pos, 0
        for page in _pages([self._rows(c) for c in chunks], per_page):
            k = sum(len(p) for p in page)
            rep = rep_row * k
            dfn = _varint((k * w) << 1) + b"\x01"
            levels = len(rep).to_bytes(4, "little") + rep + len(dfn).to_bytes(4, "little") + dfn
            self._write(_page_header(len(levels) + k * w * self.store_dtype.itemsize, k * w) + levels)
            for rows in page:
                self._write(memoryview(rows).cast("B"))
            values += k * w
        return _column_chunk(self.value_type, [_PLAIN, _RLE], ["data", "list", "element"], values, start,
                             self.pos - start)

    def _rows(self, chunk) -> np.ndarray:
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        if flat.dtype != self.store_dtype:
            flat = flat.astype(self.store_dtype)
        return np.ascontiguousarray(flat.reshape(-1, self.width))

    # -- footer --------------------------------------------------------------------------------

    def _schema_elements(self) -> list[bytes]:
        leaf = [(1, "i32", self.value_type), (3, "i32", _REQUIRED), (4, "bin", b"element")]
        if self.int_logical is not None:
            bits, signed = self.int_logical
            leaf += [(6, "i32", _CONVERTED_INT[self.int_logical]),
                     (10, "struct", _struct([(10, "struct", _struct([(1, "byte", bits), (2, "bool", signed)]))]))]
        return [
            _struct([(4, "bin", b"schema"), (5, "i32", 4)]),
            _struct([(1, "i32", _BYTE_ARRAY), (3, "i32", _REQUIRED), (4, "bin", b"request"), (6, "i32", _UTF8),
                     (10, "struct", _struct([(1, "struct", _struct([]))]))]),
            _struct([(1, "i32", _INT64), (3, "i32", _REQUIRED), (4, "bin", b"position")]),
            _struct([(1, "i32", _INT64), (3, "i32", _REQUIRED), (4, "bin", b"step")]),
            _struct([(3, "i32", _REQUIRED), (4, "bin", b"data"), (5, "i32", 1), (6, "i32", _LIST),
                     (10, "struct", _struct([(3, "struct", _struct([]))]))]),
            _struct([(3, "i32", _REPEATED), (4, "bin", b"list"), (5, "i32", 1)]),
            _struct(leaf),
        ]

    def _key_values(self) -> list[bytes]:
        # Arrow keeps its own schema (fixed-size list, field names, metadata) here, serialised
        # as an IPC message in base64; readers rebuild the Arrow types from it.
        kv = [(b"ARROW:schema", base64.b64encode(self.schema.serialize().to_pybytes()))]
        kv += list((self.schema.metadata or {}).items())
        return [_struct([(1, "bin", k), (2, "bin", v)]) for k, v in kv]


def _pages(blocks: list[np.ndarray], per_page: int):
    """Split a sequence of row blocks into pages of per_page rows (the last may be short),
    each page a list of row slices."""
    page, room = [], per_page
    for rows in blocks:
        while len(rows):
            take = rows[:room]
            page.append(take)
            rows, room = rows[room:], room - len(take)
            if room == 0:
                yield page
                page, room = [], per_page
    if page:
        yield page


def _page_header(size: int, num_values: int) -> bytes:
    v1 = _struct([(1, "i32", num_values), (2, "i32", _PLAIN), (3, "i32", _RLE), (4, "i32", _RLE)])
    return _struct([(1, "i32", 0), (2, "i32", size), (3, "i32", size), (5, "struct", v1)])


def _column_chunk(ptype: int, encodings: list[int], path: list[str], num_values: int, start: int,
                  size: int) -> bytes:
    meta = _struct([(1, "i32", ptype), (2, "list_i32", encodings), (3, "list_bin", [p.encode() for p in path]),
                    (4, "i32", 0), (5, "i64", num_values), (6, "i64", size), (7, "i64", size), (9, "i64", start)])
    return _struct([(2, "i64", start), (3, "struct", meta)])


def _int64(column) -> bytes:
    return np.ascontiguousarray(column.to_numpy(), "<i8").tobytes()


def _plain_strings(chunk) -> bytes:
    """PLAIN BYTE_ARRAY: each value as its 4-byte little-endian length, then its bytes."""
    n = len(chunk)
    if n == 0:
        return b""
    _, offsets_buf, data_buf = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[chunk.offset:chunk.offset + n + 1]
    lengths = np.diff(offsets)
    data = np.frombuffer(data_buf, np.uint8)[offsets[0]:offsets[-1]] if data_buf is not None else np.empty(0, np.uint8)
    out = np.empty(4 * n + len(data), np.uint8)
    heads = (offsets[:-1] - offsets[0]) + 4 * np.arange(n)
    out[heads[:, None] + np.arange(4)] = lengths.astype("<u4").view(np.uint8).reshape(n, 4)
    out[np.arange(len(data)) + 4 * np.repeat(np.arange(1, n + 1), lengths)] = data
    return out.tobytes()


# -- Thrift compact protocol (just what Parquet's metadata needs) -------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


_TYPE_CODE = {"i32": _T_I32, "i64": _T_I64, "bin": _T_BINARY, "struct": _T_STRUCT, "byte": _T_BYTE,
              "list_i32": _T_LIST, "list_bin": _T_LIST, "list_struct": _T_LIST}


def _struct(fields: list[tuple[int, str, object]]) -> bytes:
    """A struct from (field id, kind, value), ids ascending; ends with the stop byte."""
    out, last = bytearray(), 0
    for fid, kind, value in fields:
        code = (_T_TRUE if value else _T_FALSE) if kind == "bool" else _TYPE_CODE[kind]
        delta = fid - last
        out += bytes([(delta << 4) | code]) if 0 < delta <= 15 else bytes([code]) + _varint(_zigzag(fid))
        last = fid
        if kind in ("i32", "i64"):
            out += _varint(_zigzag(value))
        elif kind == "byte":
            out.append(value & 0xFF)
        elif kind == "bin":
            out += _varint(len(value)) + value
        elif kind == "struct":
            out += value
        elif kind.startswith("list_"):
            elem = {"list_i32": _T_I32, "list_bin": _T_BINARY, "list_struct": _T_STRUCT}[kind]
            out += bytes([(len(value) << 4) | elem]) if len(value) < 15 else bytes([0xF0 | elem]) + _varint(len(value))
            for v in value:
                out += (_varint(_zigzag(v)) if elem == _T_I32 else _varint(len(v)) + v if elem == _T_BINARY else v)
    out.append(0)
    return bytes(out)
