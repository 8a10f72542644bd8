"""What crash safety costs the HDF5 sink: write throughput against the commit interval.

    python -m matrix_bench.sink_bench [--mb 512] [--intervals inf,2,0.5,0.1,0.02]

Each commit is a two-phase flush (rows, then counters); shorter intervals lose less on a
crash and cost more. Intervals run interleaved, repeated, medians reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from dmi.sinks.base import HookInfo, RowBlock, RunMeta
from dmi.sinks.hdf5 import HDF5Sink


def one(path: str, interval: float, mb: int, hooks: int, rows: int, width: int) -> float:
    infos = [HookInfo(f"blocks.{i}.hook_resid_post", "float32", (width,)) for i in range(hooks)]
    data = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
    reqs = [str(i) for i in range(rows)]
    pos = np.arange(rows, dtype=np.int64)
    steps = int(mb * 2**20 / (hooks * data.nbytes))
    sink = HDF5Sink(path, flush_every_s=interval)
    sink.open(RunMeta("bench", "bench", "none", {}, "{}"))
    t0 = time.perf_counter()
    for s in range(steps):
        st = np.full(rows, s, dtype=np.int64)
        for info in infos:
            sink.write(RowBlock(info, data, reqs, pos, st))
    sink.close({}, complete=True)
    seconds = time.perf_counter() - t0
    os.unlink(path)
    return steps * hooks * data.nbytes / seconds / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m matrix_bench.sink_bench", description=__doc__)
    p.add_argument("--mb", type=int, default=256, help="data written per measurement")
    p.add_argument("--intervals", default="inf,2,0.5,0.1,0.02", help="commit intervals in seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hooks", type=int, default=8)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--width", type=int, default=2048)
    args = p.parse_args(argv)
    intervals = [float(x) for x in args.intervals.split(",")]
    results: dict[float, list[float]] = {i: [] for i in intervals}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for i in intervals[r % len(intervals):] + intervals[: r % len(intervals)]:
                results[i].append(one(os.path.join(d, "s.h5"), i, args.mb, args.hooks, args.rows, args.width))
    base = statistics.median(results[intervals[0]])
    print("| commit interval (s) | MB/s (median) | vs first |")
    print("|---|---|---|")
    for i in intervals:
        m = statistics.median(results[i])
        print(f"| {i:g} | {m:.0f} | {100 * (m / base - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
