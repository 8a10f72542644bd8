"""Which (request, position) rows each intervention applied to, and which it could not.

Kept as [start, stop) position ranges per request (a decode adds one position a step, which
extends the last range). The engine's thread only appends each step's rows (one list append);
they are folded into ranges when the books are read (the sink's commits, stats(), close), off
the hot path.

The per-request part grows with every request a server steers, so a sink that stores the
books at every commit takes only what changed since its last commit (`take_changes`) and the
totals (`snapshot(per_request=False)`); the reader joins them (dmi/sinks/hdf5.py, "books").
"""
from __future__ import annotations

import threading

import numpy as np

FOLD_AFTER = 4096  # steps' records kept unfolded at most


class Books:
    def __init__(self, entries: list[dict]):
        self.entries = entries  # per intervention: {"name", "hook", "op", "hooks", "capture"}
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str | None, list[str], np.ndarray, np.ndarray]] = []
        self._applied = [dict() for _ in entries]   # rid -> [[start, stop], ...]
        self._failed = [dict() for _ in entries]    # reason -> {rid: ranges}
        self._rows = [0] * len(entries)
        self._failed_rows = [0] * len(entries)
        self._dirty: set[tuple[int, str | None, str]] = set()  # (k, reason, request) changed since take_changes

    def record(self, k: int, request_ids: list[str], request: np.ndarray, position: np.ndarray,
               reason: str | None = None) -> None:
        """Rows of intervention k in one step: applied (reason None) or not (why)."""
        if len(request):
            self._pending.append((k, reason, request_ids, request, position))  # list.append: atomic
            if len(self._pending) > FOLD_AFTER:  # nobody read the books for a long while (memory sink)
                self._fold()

    def _fold(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            groups: dict[tuple[int, str | None], list] = {}
            for k, reason, ids, request, position in pending:
                groups.setdefault((k, reason), []).append((np.asarray(ids, dtype=object)[request], position))
            for (k, reason), parts in groups.items():
                rid = np.concatenate([p[0] for p in parts])
                pos = np.concatenate([p[1] for p in parts]).astype(np.int64)
                if reason is None:
                    self._rows[k] += len(pos)
                    into = self._applied[k]
                else:
                    self._failed_rows[k] += len(pos)
                    into = self._failed[k].setdefault(reason, {})
                names, code = np.unique(rid, return_inverse=True)
                order = np.lexsort((pos, code))
                code, pos = code[order], pos[order]
                cut = np.flatnonzero((np.diff(code) != 0) | (np.diff(pos) != 1)) + 1
                for a, b in zip(np.r_[0, cut], np.r_[cut, len(pos)]):
                    rid = str(names[code[a]])
                    self._dirty.add((k, reason, rid))
                    ranges = into.setdefault(rid, [])
                    start, stop = int(pos[a]), int(pos[b - 1]) + 1
                    if ranges and ranges[-1][1] == start:
                        ranges[-1][1] = stop
                    else:
                        ranges.append([start, stop])

    def snapshot(self, per_request: bool = True) -> dict:
        """Per intervention: its entry, rows applied and failed, and (per_request) which
        requests' position ranges: "requests" {rid: ranges}, "failed" {reason: {rid: ranges}}."""
        self._fold()
        with self._lock:
            out = {}
            for k, e in enumerate(self.entries):
                out[e["name"]] = {**e, "rows": self._rows[k], "failed_rows": self._failed_rows[k]}
                if per_request:
                    out[e["name"]].update(
                        requests={r: [list(x) for x in v] for r, v in self._applied[k].items()},
                        failed={why: {r: [list(x) for x in v] for r, v in d.items()}
                                for why, d in self._failed[k].items()})
            return out

    def take_changes(self) -> list[tuple[str, str, str, list[list[int]]]]:
        """(intervention name, reason or "" for applied, request, all its ranges now) of every
        (intervention, reason, request) whose ranges changed since the last call."""
        self._fold()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            out = []
            for k, reason, rid in sorted(dirty, key=lambda d: (d[0], d[1] or "", d[2])):
                ranges = (self._applied[k] if reason is None else self._failed[k][reason])[rid]
                out.append((self.entries[k]["name"], reason or "", rid, [list(x) for x in ranges]))
            return out
