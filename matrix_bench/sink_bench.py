"""What crash safety costs the HDF5 sink: write throughput against the commit interval.

    python -m matrix_bench.sink_bench [--mb 256] [--intervals inf,2,0.5,0.1,0.02]

Each commit is a two-phase flush (rows, then counters); shorter intervals lose less on a
crash and cost more. Intervals run interleaved, repeated, medians reported. The
measurement is sink_bench_all's (every sink), here for the HDF5 sink at one row width.
"""
from __future__ import annotations

import argparse
import tempfile

from matrix_bench.sink_bench_all import measure


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m matrix_bench.sink_bench", description=__doc__)
    p.add_argument("--mb", type=float, default=256, help="data written per measurement")
    p.add_argument("--intervals", default="inf,2,0.5,0.1,0.02", help="commit intervals in seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hooks", type=int, default=8)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--width", type=int, default=2048)
    args = p.parse_args(argv)
    intervals = [float(x) for x in args.intervals.split(",")]
    with tempfile.TemporaryDirectory() as d:
        med = measure(["hdf5"], [args.width], intervals, args.mb, args.repeats, args.hooks, args.rows, d)
    base = med[("hdf5", args.width, intervals[0])]
    print("| commit interval (s) | MB/s (median) | vs first |")
    print("|---|---|---|")
    for i in intervals:
        m = med[("hdf5", args.width, i)]
        print(f"| {i:g} | {m:.0f} | {100 * (m / base - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
