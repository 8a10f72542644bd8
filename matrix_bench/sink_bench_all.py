"""Write throughput of every sink against row size and commit interval.

    python -m matrix_bench.sink_bench_all [--mb 128] [--widths 256,2048,8192] [--intervals inf,2,0.5]
                                          [--sinks hdf5,dataset,dataset-bytes,dataset-safetensors,memory]

Same synthetic steps for every sink (hooks x rows float32 rows of `width`), written through the
Sink interface as the drain does; the commit interval is the sink's flush_every_s (HDF5: a
two-phase commit; dataset: publish the buffered rows as shards plus the manifest; dataset-bytes:
the dataset sink with value_encoding "bytes"). Cells run
interleaved and repeated, medians reported, plus the dataset sink's MB/s as a share of HDF5's
at the same cell (the issue asks for >= 80%).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from dmi.sinks.base import HookInfo, RowBlock, RunMeta

SINKS = ("hdf5", "dataset", "dataset-bytes", "dataset-safetensors", "memory")


def make_sink(kind: str, path: str, interval: float, encode_threads: int | None = None):
    every = None if interval == float("inf") else interval
    if kind == "hdf5":
        from dmi.sinks.hdf5 import HDF5Sink

        return HDF5Sink(path + ".h5", flush_every_s=interval)
    if kind.startswith("dataset"):
        import pyarrow.parquet  # noqa: F401  (imported before the clock starts, as a running session has)

        from dmi.sinks.dataset import DatasetSink

        fmt = "safetensors" if kind.endswith("safetensors") else "parquet"
        return DatasetSink(path + ".ds", shard_format=fmt, flush_every_s=every, encode_threads=encode_threads,
                           value_encoding="bytes" if kind.endswith("bytes") else "list")
    if kind == "memory":
        from dmi.sinks.memory import MemorySink

        return MemorySink(max_bytes=1 << 40)
    raise ValueError(f"unknown sink {kind!r}; choose from {', '.join(SINKS)}")


def one(kind: str, path: str, interval: float, mb: float, hooks: int, rows: int, width: int,
        encode_threads: int | None = None) -> float:
    infos = [HookInfo(f"blocks.{i}.hook_resid_post", "float32", (width,)) for i in range(hooks)]
    data = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
    reqs = [str(i) for i in range(rows)]
    pos = np.arange(rows, dtype=np.int64)
    steps = max(1, int(mb * 2**20 / (hooks * data.nbytes)))
    sink = make_sink(kind, path, interval, encode_threads)
    sink.open(RunMeta("bench", "bench", "none", {}, "{}"))
    t0 = time.perf_counter()
    for s in range(steps):
        st = np.full(rows, s, dtype=np.int64)
        for info in infos:
            sink.write(RowBlock(info, data, reqs, pos, st))
    sink.close({}, complete=True)
    seconds = time.perf_counter() - t0
    for p in (path + ".h5", path + ".ds"):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)
    return steps * hooks * data.nbytes / seconds / 1e6


def measure(sinks: list[str], widths: list[int], intervals: list[float], mb: float, repeats: int, hooks: int,
            rows: int, workdir: str, encode_threads: int | None = None) -> dict[tuple[str, int, float], float]:
    cells = [(k, w, i) for w in widths for i in intervals for k in sinks if not (k == "memory" and i != intervals[0])]
    results: dict[tuple[str, int, float], list[float]] = {c: [] for c in cells}
    for r in range(repeats):
        for c in cells[r % len(cells):] + cells[: r % len(cells)]:
            results[c].append(one(c[0], os.path.join(workdir, "s"), c[2], mb, hooks, rows, c[1], encode_threads))
    return {c: statistics.median(v) for c, v in results.items()}


def report(med: dict[tuple[str, int, float], float], sinks: list[str], widths: list[int],
           intervals: list[float], rows: int) -> str:
    lines = ["| sink | row bytes | commit interval (s) | MB/s (median) | vs HDF5 |", "|---|---|---|---|---|"]
    for w in widths:
        for i in intervals:
            base = med.get(("hdf5", w, i))
            for k in sinks:
                m = med.get((k, w, i))
                if m is None:
                    continue
                share = f"{100 * m / base:.0f}%" if base else "-"
                lines.append(f"| {k} | {4 * w} ({rows} rows/block) | {i:g} | {m:.0f} | {share} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m matrix_bench.sink_bench_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sinks", default=",".join(SINKS))
    p.add_argument("--mb", type=float, default=128, help="data written per measurement")
    p.add_argument("--widths", default="256,2048,8192", help="row widths (float32 values per row)")
    p.add_argument("--intervals", default="inf,2,0.5", help="commit intervals in seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hooks", type=int, default=8)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--dir", help="where to write (default: a temporary folder)")
    p.add_argument("--encode-threads", type=int, default=None,
                   help="the dataset sink's Parquet encoder threads (default: its own, min(4, cores); 0: none)")
    args = p.parse_args(argv)
    sinks = [s for s in args.sinks.split(",") if s]
    bad = [s for s in sinks if s not in SINKS]
    if bad:
        p.error(f"unknown sink {bad[0]!r}; choose from {', '.join(SINKS)}")
    widths = [int(x) for x in args.widths.split(",")]
    intervals = [float(x) for x in args.intervals.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        med = measure(sinks, widths, intervals, args.mb, args.repeats, args.hooks, args.rows, d, args.encode_threads)
    print(report(med, sinks, widths, intervals, args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
