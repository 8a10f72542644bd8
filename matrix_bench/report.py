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
        over = _overheads(by_mode, modes, "seconds")
        lines.append(f"| {engine} | {b} | {d} | " + " | ".join(tps) + " | " + " | ".join(over) + " |")
    if any(x.get("cpu_s", float("nan")) == x.get("cpu_s") for c in cells.values() for xs in c.values() for x in xs):
        others = [m for m in modes if m != "off"]
        lines += ["", "CPU overhead (CPU seconds of the whole process, every thread, median of per-repeat ratios "
                      "to `off` [quartiles]; unlike the wall clock, blind to other tenants of a shared machine; "
                      "HF only):", "",
                  "| engine | batch | decode | " + " | ".join(others) + " |", "|" + "---|" * (3 + len(others))]
        for (engine, b, d), by_mode in sorted(cells.items()):
            lines.append(f"| {engine} | {b} | {d} | " + " | ".join(_overheads(by_mode, modes, "cpu_s")) + " |")
    lines += _metric_table(cells, modes, "Per-step latency (ms, median):", "step_ms", 1.0, ".1f")
    lines += _metric_table(cells, modes, "Peak memory (MB, median; process RSS on CPU, allocated on GPU):",
                           "peak_mem", 1e6, ".0f")
    if skipped:
        lines.append("")
        by_reason: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in skipped:
            if r["mode"] not in by_reason[(r["engine"], r["status"])]:
                by_reason[(r["engine"], r["status"])].append(r["mode"])
        all_modes = set(modes) | {r["mode"] for r in skipped}
        for (engine, status), ms in sorted(by_reason.items()):
            which = "all modes" if set(ms) >= all_modes else ", ".join(ms)
            lines.append(f"- {engine} ({which}): {status}")
    return "\n".join(lines) + "\n"


def _overheads(by_mode, modes, key: str) -> list[str]:
    """Per mode but `off`: the median over repeats of its ratio to the `off` run of the same
    repeat (modes interleave within a repeat), as a signed percentage."""
    off = {x["repeat"]: x.get(key) for x in by_mode.get("off", [])}
    out = []
    for m in modes:
        if m == "off":
            continue
        ratios = [x[key] / off[x["repeat"]] - 1 for x in by_mode.get(m, [])
                  if off.get(x["repeat"]) and x.get(key) == x.get(key) and off[x["repeat"]] == off[x["repeat"]]]
        out.append(_ratio_cell(ratios))
    return out


def _ratio_cell(ratios: list[float]) -> str:
    """The median, and from 4 repeats on the quartiles: on a noisy machine a cell's median
    moves between runs by about the width of that range, which says how far to trust it."""
    if not ratios:
        return "n/a"
    cell = f"{100 * statistics.median(ratios):+.1f}%"
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        cell += f" [{100 * q1:+.1f}, {100 * q3:+.1f}]"
    return cell


def _metric_table(cells, modes, title: str, key: str, scale: float, fmt: str) -> list[str]:
    lines = ["", title, "", "| engine | batch | decode | " + " | ".join(modes) + " |", "|" + "---|" * (3 + len(modes))]
    for (engine, b, d), by_mode in sorted(cells.items()):
        vals = [format(statistics.median([x[key] for x in by_mode[m]]) / scale, fmt) if by_mode.get(m) else "n/a"
                for m in modes]
        lines.append(f"| {engine} | {b} | {d} | " + " | ".join(vals) + " |")
    return lines


def _drops(runs: list[dict]) -> str:
    dropped = [x["rows_dropped"] for x in runs]
    return f" ({statistics.median(dropped):.0f} rows dropped)" if dropped and max(dropped) > 0 else ""


def _med_spread(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    med = statistics.median(xs)
    return f"{med:.1f} ±{(max(xs) - min(xs)) / 2:.1f}" if len(xs) > 1 else f"{med:.1f}"


def plots(rows: list[dict], report_path: str) -> list[str]:
    """PNG plots beside the report: throughput vs batch size (at the longest decode length),
    throughput vs decode length (at the largest batch), and overhead per engine and mode.
    Returns the file names written; none when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import os

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    base = os.path.splitext(report_path)[0]
    engines = sorted({r["engine"] for r in ok})
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    written = []

    def med(sel, key="tokens_per_s"):
        vals = [r[key] for r in sel]
        return statistics.median(vals) if vals else float("nan")

    for axis, fixed_key, name in (("batch", "decode_len", "throughput-vs-batch"),
                                  ("decode_len", "batch", "throughput-vs-decode")):
        fig, axes = plt.subplots(1, len(engines), figsize=(5 * len(engines), 4), squeeze=False)
        for ax, engine in zip(axes[0], engines):
            er = [r for r in ok if r["engine"] == engine]
            fixed = max(r[fixed_key] for r in er)
            xs = sorted({r[axis] for r in er if r[fixed_key] == fixed})
            for m in modes:
                ys = [med([r for r in er if r["mode"] == m and r[axis] == x and r[fixed_key] == fixed]) for x in xs]
                ax.plot(xs, ys, marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size" if axis == "batch" else "decode length")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"{engine}, {fixed_key.replace('_', ' ')} {fixed}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{base}-{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(os.path.basename(path))

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(modes) * len(engines)), 4))
    others = [m for m in modes if m != "off"]
    width = 0.8 / max(len(engines), 1)
    for i, engine in enumerate(engines):
        er = [r for r in ok if r["engine"] == engine]
        off = {(r["batch"], r["decode_len"], r["repeat"]): r["seconds"] for r in er if r["mode"] == "off"}
        ys = []
        for m in others:
            ratios = [100 * (r["seconds"] / off[k] - 1) for r in er if r["mode"] == m
                      and (k := (r["batch"], r["decode_len"], r["repeat"])) in off]
            ys.append(statistics.median(ratios) if ratios else 0.0)
        ax.bar([j + i * width for j in range(len(others))], ys, width=width, label=engine)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(others))], others, rotation=20)
    ax.set_ylabel("overhead vs off (%, median over cells)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    path = f"{base}-overhead.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(os.path.basename(path))
    return written
