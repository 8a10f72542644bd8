"""`dmi export SRC --to parquet|safetensors|hdf5 DEST`: convert a run between an HDF5 file and a
dataset folder (or s3://... URL), with a progress bar. Every row, position, step, gap and the
stats carry over; the destination is never overwritten unless --overwrite is given."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

FORMATS = ("parquet", "safetensors", "hdf5")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="convert a run: HDF5 file <-> Parquet or safetensors dataset folder",
                       description=__doc__)
    p.add_argument("src", help="an HDF5 run file, or a dataset folder / URL / manifest")
    p.add_argument("--to", required=True, choices=FORMATS, dest="to_format")
    p.add_argument("dest", help="a folder or s3://... URL for parquet/safetensors, a file for hdf5")
    p.add_argument("--shard-mb", type=float, default=128, help="dataset shard size in MB (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def export(args: argparse.Namespace) -> str:
    import dmi
    from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta

    if args.shard_mb <= 0:
        raise ValueError(f"--shard-mb must be positive, got {args.shard_mb}")
    run = dmi.open(args.src)
    try:
        sink = _sink(args)
        meta = run.meta
        spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
        sink.open(RunMeta(dmi_version=dmi.__version__, engine=str(meta.get("engine", "")),
                          model=str(meta.get("model", "")), model_config=meta.get("model_config") or {},
                          spec_json=json.dumps(spec), extra={"exported_from": str(args.src)}))
        total = len(run.hooks) * len(run.requests)
        rows = 0
        with _progress(total, args.quiet, f"dmi export -> {args.to_format}") as bar:
            for hook in run.hooks:
                info = HookInfo(hook, run.dtype(hook), tuple(run.shape(hook)), ragged=run.ragged(hook),
                                source=run.source(hook))
                for r in run.requests:
                    t = run.get(hook, r)
                    if len(t):
                        sink.write(RowBlock(info, _numpy(t), [r] * len(t), run.positions(hook, r).numpy(),
                                            run.steps(hook, r).numpy()))
                        rows += len(t)
                    bar.update(1)
        grouped = defaultdict(list)
        for g in run.gaps():
            grouped[(g["hook"], g["reason"])].append(g)
        for (hook, reason), gs in grouped.items():
            import numpy as np

            sink.write_gaps(GapBlock(hook, [g["request"] for g in gs], np.array([g["position"] for g in gs]),
                                     np.array([g["step"] for g in gs]), reason))
        sink.close(run.stats, complete=run.complete)
    finally:
        run.close()
    return f"dmi export: {rows} rows of {len(run.hooks)} hooks, {len(run.requests)} requests -> {args.dest}"


def _sink(args):
    if args.to_format == "hdf5":
        from dmi.sinks.hdf5 import HDF5Sink, check_writable

        if "://" in args.dest:
            raise ValueError(f"--to hdf5 writes a local file, not {args.dest!r}")
        check_writable(args.dest, overwrite=args.overwrite)
        return HDF5Sink(args.dest, overwrite=args.overwrite, flush_every_s=3600)
    try:
        import fsspec  # noqa: F401
        import pyarrow  # noqa: F401
        if args.to_format == "safetensors":
            import safetensors  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--to {args.to_format} needs the data extra: pip install 'dmi[data]' ({e})") from None
    from dmi.sinks.dataset import DatasetSink

    sink = DatasetSink(args.dest, rank=0, shard_bytes=int(args.shard_mb * 2**20), overwrite=args.overwrite,
                       shard_format=args.to_format)
    sink.check_writable()
    return sink


def _numpy(t):
    import torch

    if t.dtype == torch.bfloat16:   # sinks take bfloat16 as uint16 bit patterns
        return t.view(torch.int16).numpy().view("uint16")
    return t.numpy()


class _progress:
    """tqdm when it is installed and wanted; otherwise nothing."""

    def __init__(self, total: int, quiet: bool, desc: str) -> None:
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="hook x request", file=sys.stderr)
            except ImportError:
                pass

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
