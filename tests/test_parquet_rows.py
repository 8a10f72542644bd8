"""dmi's own Parquet writer for row tables (dmi/sinks/parquet_rows.py) against Arrow's writer
and against a reader that is not Arrow's (DuckDB): same schema, same values, every dtype the
dataset sink writes, rows split across chunks and pages, several row groups."""
from __future__ import annotations

import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from dmi.sinks.base import HookInfo  # noqa: E402
from dmi.sinks.dataset import DatasetSink, rows_table  # noqa: E402
from dmi.sinks import parquet_rows  # noqa: E402
from dmi.sinks.parquet_rows import RowsParquetWriter  # noqa: E402

DTYPES = [(np.float32, "float32"), (np.float64, "float64"), (np.uint16, "bfloat16"), (np.int16, "int16"),
          (np.int32, "int32"), (np.int64, "int64"), (np.uint8, "uint8"), (np.int8, "int8")]


def _tables(dt, hook_dtype, shape, rng, groups=3):
    info = HookInfo("blocks.0.hook_resid_post", hook_dtype, shape)
    out = []
    for _ in range(groups):
        # Several blocks per row group (one Arrow chunk each), request ids of varied length
        # (empty, multi-byte) taken from a frame table as the sink does.
        blocks = [(rng.standard_normal((int(m),) + shape) * 100).astype(dt) for m in rng.integers(1, 9, 3)]
        n = sum(len(b) for b in blocks)
        ids = pa.array(["", "0", "é1", "req-ü-22", "x" * 40], pa.string()).take(pa.array(rng.integers(0, 5, n)))
        out.append(rows_table(info, np.dtype(dt), blocks, ids, rng.integers(0, 1 << 40, n),
                              rng.integers(-5, 1000, n)))
    return out


def _write(path, tables, writer):
    out = pa.OSFile(str(path), "wb")
    w = writer(out, tables[0].schema)
    for t in tables:
        w.write_table(t)
    w.close()
    out.close()


@pytest.mark.parametrize("dt,hook_dtype", DTYPES, ids=[d[1] for d in DTYPES])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (40000,)], ids=str)
def test_same_table_as_arrows_writer(tmp_path, monkeypatch, dt, hook_dtype, shape):
    monkeypatch.setattr(parquet_rows, "PAGE_BYTES", 64 << 10)   # pages span chunks and split them
    tables = _tables(dt, hook_dtype, shape, np.random.default_rng(len(shape) * 100 + shape[0]))
    assert RowsParquetWriter.takes(tables[0].schema, "none")
    _write(tmp_path / "ours.parquet", tables, RowsParquetWriter)
    _write(tmp_path / "arrow.parquet", tables, lambda out, schema: pq.ParquetWriter(out, schema, compression="none"))
    ours, ref = pq.read_table(tmp_path / "ours.parquet"), pq.read_table(tmp_path / "arrow.parquet")
    assert ours.schema.equals(ref.schema, check_metadata=True)
    assert ours.equals(ref)
    assert ref.column("data").to_pylist() == [r for t in tables for r in t.column("data").to_pylist()]
    f = pq.ParquetFile(tmp_path / "ours.parquet")
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == ref.num_rows
    assert [f.metadata.row_group(i).num_rows for i in range(3)] == [t.num_rows for t in tables]
    # Batches that cut across pages and row groups read the same rows.
    assert pa.Table.from_batches(list(f.iter_batches(batch_size=3))).to_pylist() == ref.to_pylist()


def test_read_by_a_reader_that_is_not_arrows(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    tables = _tables(np.float32, "float32", (6,), np.random.default_rng(5))
    _write(tmp_path / "ours.parquet", tables, RowsParquetWriter)
    rows = duckdb.sql(f"select request, position, step, data from read_parquet('{tmp_path / 'ours.parquet'}')").fetchall()
    ref = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == len(ref)
    for (req, pos, step, data), want in zip(rows, ref):
        assert (req, pos, step) == (want["request"], want["position"], want["step"])
        np.testing.assert_array_equal(np.asarray(data, np.float32), np.asarray(want["data"], np.float32))
    kinds = dict(duckdb.sql(f"select name, logical_type from parquet_schema('{tmp_path / 'ours.parquet'}')").fetchall())
    assert "String" in kinds["request"] and "List" in kinds["data"]


def test_what_it_does_not_take_keeps_arrows_writer(tmp_path):
    rng = np.random.default_rng(1)
    plain = _tables(np.float32, "float32", (4,), rng, 1)[0].schema
    assert RowsParquetWriter.takes(plain, "none") and RowsParquetWriter.takes(plain, None)
    assert not RowsParquetWriter.takes(plain, "zstd")
    assert not RowsParquetWriter.takes(_tables(np.float16, "float16", (4,), rng, 1)[0].schema, "none")
    ragged = rows_table(HookInfo("attn", "float32", (2, 3), ragged=True), np.dtype(np.float32),
                        [np.ones((2, 2, 3), np.float32)], ["a", "b"], np.arange(2), np.zeros(2, np.int64))
    assert not RowsParquetWriter.takes(ragged.schema, "none")
    raw = rows_table(HookInfo("h", "float32", (4,)), np.dtype(np.float32), [np.ones((2, 4), np.float32)],
                     ["a", "b"], np.arange(2), np.zeros(2, np.int64), "bytes")
    assert not RowsParquetWriter.takes(raw.schema, "none")
    # Through the sink: a compressed dataset still writes (Arrow's writer) and reads back.
    from dmi.testing import run_read_back, run_sink_conformance
    import dmi

    run_sink_conformance(lambda d: DatasetSink(str(d / "ds"), compression="zstd"),
                         lambda d: run_read_back(dmi.open(str(d / "ds"))), tmp_path)
    assert pq.ParquetFile(next((tmp_path / "ds").rglob("*.parquet"))).metadata.row_group(0).column(0).compression == "ZSTD"


def test_the_dataset_sink_writes_its_rows_with_it(tmp_path):
    from dmi.testing import run_read_back, run_sink_conformance
    import dmi

    run_sink_conformance(lambda d: DatasetSink(str(d / "ds")), lambda d: run_read_back(dmi.open(str(d / "ds"))),
                         tmp_path)
    shards = [p for p in (tmp_path / "ds").rglob("*.parquet") if not p.parent.name.startswith("_")]
    writers = {(json.loads(pq.read_schema(p).metadata[b"dmi"])["ragged"], pq.ParquetFile(p).metadata.created_by.split()[0])
               for p in shards}
    assert writers == {(False, "dmi"), (True, "parquet-cpp-arrow")}   # ragged rows keep Arrow's writer
