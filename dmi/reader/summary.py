"""Plain-text summary of a run, printed by `dmi inspect OUT.h5`."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import torch

from dmi.reader.run import Run, natural_key

MAX_NORM_ROWS = 4096
# Bounds on the norm scan, so that inspecting a large capture of hundreds of hooks (or of
# logits-sized rows) reads a few hundred MB at most, not the whole file.
TOTAL_NORM_BYTES = 512 << 20
MIN_HOOK_NORM_BYTES = 1 << 20
MAX_HOOK_NORM_BYTES = 64 << 20
SLICE_BYTES = 16 << 20
N_SLICES = 8
SHOWN_REQUESTS = 5
SHOWN_GAPS = 8
SUFFIXES_PER_TABLE = 6

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def summarize(run: Run) -> str:
    meta = run.meta
    out: list[str] = [
        f"file:      {run.path}",
        f"status:    {_status(meta)}",
        f"dmi:       {meta.get('dmi_version', '?')}  (format {meta.get('format')} v{meta.get('format_version', '?')})",
        f"engine:    {meta.get('engine', '?')}",
        f"model:     {meta.get('model', '?')}",
    ]
    if meta.get("created"):
        out.append(f"created:   {meta['created']}")
    ranks = getattr(run, "ranks", None)
    if ranks is not None:
        out.append(f"ranks:     {len(ranks)} tensor-parallel files, merged ("
                   + ", ".join(r.path for r in ranks[1:]) + " beside this one)")
    reqs = run.requests
    shown = ", ".join(reqs[:SHOWN_REQUESTS]) + (", ..." if len(reqs) > SHOWN_REQUESTS else "")
    out.append(f"requests:  {len(reqs)}" + (f"  ({shown})" if reqs else ""))
    hooks = run.hooks
    out += ["", f"hooks: {len(hooks)}"]
    if hooks:
        out += _table(["hook", "dtype", "row shape", "rows", "MB"], [
            [h, (run.dtype(h) or "-") + (" ragged" if run.ragged(h) else ""), _shape(run.shape(h)) if run.dtype(h) else "-",
             str(run.num_rows(h)), f"{run.data_bytes(h) / 1e6:.2f}"]
            for h in hooks
        ], right={3, 4})
        out.append(f"total: {sum(run.num_rows(h) for h in hooks)} rows, "
                   f"{sum(run.data_bytes(h) for h in hooks) / 1e6:.2f} MB of rows "
                   f"({sum(run.nbytes(h) for h in hooks) / 1e6:.2f} MB in whole chunks on disk)")
    out += [""] + _drops(run)
    if hooks:
        out += [""] + _norms(run, hooks)
    return "\n".join(out).rstrip() + "\n"


def _status(meta: dict[str, Any]) -> str:
    if meta.get("complete"):
        return "complete"
    cut = meta.get("salvaged")
    if isinstance(cut, dict):
        return (f"INCOMPLETE, salvaged: {cut.get('size')} of {cut.get('length')} bytes present; "
                f"rows past the cut are left out")
    return "INCOMPLETE (writer still running or crashed)"


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset(), indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return (indent + "  ".join(cells)).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _drops(run: Run) -> list[str]:
    """The books per hook (produced = filtered + written + dropped), then what is missing where."""
    stats = run.stats
    hook_stats = stats.get("hooks") if isinstance(stats.get("hooks"), dict) else {}
    gap_rows = run.gaps()
    gap_drops = Counter(g["hook"] for g in gap_rows)
    out = []
    # A run whose writer stopped before its first commit with stats has no books, only the
    # rows the file holds: say so rather than print zeros that look like a clean run.
    has_books = any("produced" in c for c in hook_stats.values())
    if has_books:
        counters = ("produced", "filtered", "written", "committed", "dropped")
        rows = [[h] + [str(int(c.get(k, 0))) for k in counters] + [str(gap_drops.get(h, 0))]
                for h, c in sorted(hook_stats.items(), key=lambda kv: natural_key(kv[0]))]
        out += ["accounting (rows per hook; produced = filtered + written + dropped; committed: in the file, "
                "readable):"]
        out += _table(["hook", *counters, "gaps"], rows, right={1, 2, 3, 4, 5, 6})
        ring = stats.get("ring") or {}
        if ring:
            out.append(f"ring: {_human(ring.get('bytes', 0))}, high-water "
                       f"{_human(ring.get('high_water_bytes', 0))} "
                       f"({100 * ring.get('high_water_bytes', 0) / max(ring.get('bytes', 1), 1):.0f}%)")
        out.append(f"throughput: drain {stats.get('drain_mb_s', 0):.1f} MB/s, sink {stats.get('sink_mb_s', 0):.1f} MB/s "
                   f"over {stats.get('elapsed_s', 0):.1f} s, {stats.get('steps', 0)} steps")
        out.append("")
    if has_books:
        total = sum(int(c.get("dropped", 0)) for c in hook_stats.values())
        head = f"dropped rows: {total} (stats), {len(gap_rows)} (gaps)"
    else:
        out.append("accounting: none recorded (the writer stopped before it committed its books)")
        head = f"dropped rows: {len(gap_rows)} (gaps)"
    reasons = Counter(g["reason"] for g in gap_rows)
    if reasons:
        head += "  by reason: " + ", ".join(f"{r}={n}" for r, n in reasons.most_common())
    out.append(head)
    switches = stats.get("degrade_switches") or []
    if switches:
        out.append("degrade switches: " + ", ".join(f"step {w['step']} -> {w['to']} (ring {100 * w['ring_fill']:.0f}%)"
                                                 for w in switches[:8]) + (" ..." if len(switches) > 8 else ""))
    missing: dict[tuple[str, str], list[int]] = {}
    for g in gap_rows:
        missing.setdefault((g["hook"], g["request"]), []).append(int(g["position"]))
    for (hook, req), pos in sorted(missing.items(), key=lambda kv: (natural_key(kv[0][0]), kv[0][1]))[:SHOWN_GAPS]:
        out.append(f"  missing {hook} request {req}: positions {_ranges(sorted(pos))}")
    if len(missing) > SHOWN_GAPS:
        out.append(f"  ... {len(missing) - SHOWN_GAPS} more (hook, request) pairs with gaps: run.gaps()")
    for err in stats.get("errors") or []:
        out.append(f"error: {err}")
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ranges(pos: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" """
    parts, start = [], None
    for i, p in enumerate(pos):
        if start is None:
            start = p
        if i + 1 == len(pos) or pos[i + 1] != p + 1:
            parts.append(str(start) if start == p else f"{start}-{p}")
            start = None
    return ", ".join(parts)


def _norms(run: Run, hooks: list[str]) -> list[str]:
    by_suffix: dict[str, dict[int, str]] = defaultdict(dict)
    other: list[str] = []
    for h in hooks:
        m = _LAYER_RE.match(h)
        if m:
            by_suffix[m.group(2)][int(m.group(1))] = h
        else:
            other.append(h)

    per_hook = min(MAX_HOOK_NORM_BYTES, max(MIN_HOOK_NORM_BYTES, TOTAL_NORM_BYTES // len(hooks)))
    out = [f"mean L2 norm per row (float32, up to {MAX_NORM_ROWS} rows or {per_hook >> 20} MiB sampled "
           "per hook; integer hooks show the row count)"]
    suffixes = sorted(by_suffix, key=_suffix_order)
    for i in range(0, len(suffixes), SUFFIXES_PER_TABLE):
        group = suffixes[i:i + SUFFIXES_PER_TABLE]
        layers = sorted({layer for s in group for layer in by_suffix[s]})
        rows = [[str(layer)] + [_norm_cell(run, by_suffix[s].get(layer), per_hook) for s in group]
                for layer in layers]
        out += [""] + _table(["layer", *group], rows, right=set(range(1, len(group) + 1)))
    if other:
        out += [""] + _table(["hook", "mean norm"], [[h, _norm_cell(run, h, per_hook)] for h in other], right={1})
    return out


def _suffix_order(suffix: str) -> tuple[Any, ...]:
    # Forward order (resid_pre, attn..., mlp..., resid_post) reads better than alphabetical.
    try:
        from dmi.hooknames import HOOK_TYPES

        order = [t.suffix for t in HOOK_TYPES]
    except ImportError:
        order = []
    return (order.index(suffix) if suffix in order else len(order), natural_key(suffix))


def _norm_cell(run: Run, hook: str | None, max_bytes: int) -> str:
    if hook is None:
        return "-"
    n = run.num_rows(hook)
    if n == 0:
        return "no rows"
    dt = getattr(torch, run.dtype(hook) or "", None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        return f"n={n}"
    try:
        value, nonfinite = row_norm_stats(run, hook, max_bytes=max_bytes)
    except ValueError:  # a tensor-parallel run whose ranks dropped different rows of this hook
        return "n/a (ranks differ)"
    # NaN/Inf rows are worth flagging on their own rather than turning the mean into nan.
    return f"{value:#.4g}" + (f" ({nonfinite} nan/inf)" if nonfinite else "")


def row_norm_stats(run: Run, hook: str, max_rows: int = MAX_NORM_ROWS,
                   max_bytes: int = MAX_HOOK_NORM_BYTES) -> tuple[float, int]:
    """(mean L2 norm over finite rows, number of rows with NaN/Inf) of a sample of rows, read as
    a few evenly spread contiguous slices; norms are computed in float32."""
    n = run.num_rows(hook)
    shape = run.shape(hook)
    row_bytes = max(1, getattr(torch, run.dtype(hook), torch.uint8).itemsize * _prod(shape))  # any reader, not only HDF5
    budget = max(1, min(max_rows, max_bytes // row_bytes, n))
    per_slice = max(1, min(-(-budget // N_SLICES), SLICE_BYTES // row_bytes))
    n_slices = max(1, min(N_SLICES, budget // per_slice))
    # Contiguous slices are one read each; spreading them samples early and late steps alike.
    starts = sorted({int(round(k * (n - per_slice) / max(1, n_slices - 1))) for k in range(n_slices)})
    total, count, nonfinite = 0.0, 0, 0
    for s in starts:
        rows = run.read_rows(hook, s, min(n, s + per_slice)).to(torch.float32)
        norms = torch.linalg.vector_norm(rows.reshape(rows.shape[0], -1), dim=1)
        finite = torch.isfinite(norms)
        total += float(norms[finite].sum())
        count += int(finite.sum())
        nonfinite += int((~finite).sum())
    return (total / count if count else float("nan")), nonfinite


def _prod(shape: tuple[int, ...]) -> int:
    p = 1
    for d in shape:
        p *= int(d)
    return p
