"""Markdown table from benchmark rows: tokens/s per mode, overhead as a ratio to `off`."""
from __future__ import annotations

import statistics
from collections import defaultdict


def markdown(rows: list[dict]) -> str:
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    skipped = []
    for r in rows:
        if r["status"] != "ok":
            skipped.append(r)
            continue
        cells[(r["engine"], r["batch"], r["decode_len"])][r["mode"]].append(r)
    modes = []
    for c in cells.values():
        modes += [m for m in c if m not in modes]
    head = "| engine | batch | decode | " + " | ".join(f"{m} tok/s" for m in modes) + " | " + \
           " | ".join(f"{m} overhead" for m in modes if m != "off") + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(modes) - ("off" in modes)) ]
    for (engine, b, d), by_mode in sorted(cells.items()):
        tps = [_med_spread([x["tokens_per_s"] for x in by_mode.get(m, [])]) + _drops(by_mode.get(m, []))
               for m in modes]
        over = []
        off = {x["repeat"]: x["seconds"] for x in by_mode.get("off", [])}
        for m in modes:
            if m == "off":
                continue
            # per-repeat ratio to the `off` run of the same repeat, then the median
            ratios = [x["seconds"] / off[x["repeat"]] - 1 for x in by_mode.get(m, []) if x["repeat"] in off]
            over.append(f"{100 * statistics.median(ratios):+.1f}%" if ratios else "n/a")
        lines.append(f"| {engine} | {b} | {d} | " + " | ".join(tps) + " | " + " | ".join(over) + " |")
    if skipped:
        lines.append("")
        reasons = sorted({(r["engine"], r["mode"], r["status"]) for r in skipped})
        lines += [f"- {e} {m}: {s}" for e, m, s in reasons]
    return "\n".join(lines) + "\n"


def _drops(runs: list[dict]) -> str:
    dropped = [x["rows_dropped"] for x in runs]
    return f" ({statistics.median(dropped):.0f} rows dropped)" if dropped and max(dropped) > 0 else ""


def _med_spread(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    med = statistics.median(xs)
    return f"{med:.1f} ±{(max(xs) - min(xs)) / 2:.1f}" if len(xs) > 1 else f"{med:.1f}"
