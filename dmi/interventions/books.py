"""Which (request, position) rows each intervention applied to, and which it could not.

Kept as [start, stop) position ranges per request (a decode adds one position a step, which
extends the last range), so the books stay small and go into the run's stats at every commit.
"""
from __future__ import annotations

import threading

import numpy as np


class Books:
    def __init__(self, entries: list[dict]):
        self.entries = entries  # per intervention: {"name", "hook", "op", "hooks"}
        self._lock = threading.Lock()
        self._applied = [dict() for _ in entries]   # rid -> [[start, stop], ...]
        self._failed = [dict() for _ in entries]    # reason -> {rid: ranges}
        self._rows = [0] * len(entries)
        self._failed_rows = [0] * len(entries)

    def record(self, k: int, request_ids: list[str], request: np.ndarray, position: np.ndarray,
               reason: str | None = None) -> None:
        """Rows of intervention k in one step: applied (reason None) or not (why)."""
        if not len(request):
            return
        with self._lock:
            if reason is None:
                self._rows[k] += len(request)
                into = self._applied[k]
            else:
                self._failed_rows[k] += len(request)
                into = self._failed[k].setdefault(reason, {})
            order = np.lexsort((position, request))
            request, position = request[order], position[order]
            cut = np.flatnonzero((np.diff(request) != 0) | (np.diff(position) != 1)) + 1
            for a, b in zip(np.r_[0, cut], np.r_[cut, len(request)]):
                rid, start, stop = request_ids[int(request[a])], int(position[a]), int(position[b - 1]) + 1
                ranges = into.setdefault(rid, [])
                if ranges and ranges[-1][1] == start:
                    ranges[-1][1] = stop
                else:
                    ranges.append([start, stop])

    def snapshot(self) -> dict:
        with self._lock:
            out = {}
            for k, e in enumerate(self.entries):
                out[e["name"]] = {**e, "rows": self._rows[k],
                                  "requests": {r: [list(x) for x in v] for r, v in self._applied[k].items()},
                                  "failed_rows": self._failed_rows[k],
                                  "failed": {why: {r: [list(x) for x in v] for r, v in d.items()}
                                             for why, d in self._failed[k].items()}}
            return out
