"""The books: per hook, rows produced = filtered + written + dropped, always.

`in_flight` rows are captured but not yet written; after a flush it is zero.
`written` rows were handed to the sink; `committed` (not part of the sum) are those of them the
sink has since made durable and readable (counted at each of its commits), which after a
successful flush or close equals `written`.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict


class Accounting:
    COUNTERS = ("produced", "filtered", "written", "committed", "dropped", "in_flight")

    def __init__(self):
        self._lock = threading.Lock()
        self.hooks: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(self.COUNTERS, 0))
        self.drop_reasons: dict[str, int] = defaultdict(int)
        self.dropped_by_request: dict[str, int] = defaultdict(int)
        self.switches: list[dict] = []   # degrade policy: every switch, in order
        self.not_computed: dict[str, int] = defaultdict(int)  # rows the engine skipped (prefix cache), by reason
        self.bytes_captured = 0
        self.bytes_drained = 0
        self.bytes_written = 0
        self.frames = 0
        self.steps = 0
        self.errors: list[str] = []
        self.started = time.monotonic()

    def captured(self, hook: str, produced: int, filtered: int, kept: int, nbytes: int) -> None:
        with self._lock:
            h = self.hooks[hook]
            h["produced"] += produced
            h["filtered"] += filtered
            h["in_flight"] += kept
            self.bytes_captured += nbytes
            self.frames += 1

    def captured_many(self, names: list[str], books: list[tuple]) -> None:
        """captured() for each (hook index into names, produced, filtered, kept, nbytes), under
        one lock: a step's books at once."""
        with self._lock:
            hooks = self.hooks
            for i, produced, filtered, kept, nbytes in books:
                h = hooks[names[i]]
                h["produced"] += produced
                h["filtered"] += filtered
                h["in_flight"] += kept
                self.bytes_captured += nbytes
            self.frames += len(books)

    def dropped(self, hook: str, n: int, reason: str, produced: int = 0, filtered: int = 0,
                in_flight: bool = False, requests=()) -> None:
        with self._lock:
            h = self.hooks[hook]
            h["produced"] += produced
            h["filtered"] += filtered
            h["dropped"] += n
            if in_flight:
                h["in_flight"] -= n
            self.drop_reasons[reason] += n
            for r in requests:
                self.dropped_by_request[r] += 1

    def refiltered(self, hook: str, n: int) -> None:
        """Rows captured, then found (by the drain) to be ones the filters leave out."""
        with self._lock:
            h = self.hooks[hook]
            h["in_flight"] -= n
            h["filtered"] += n

    def skipped(self, n: int, reason: str) -> None:
        with self._lock:
            self.not_computed[reason] += n

    def drained(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_drained += nbytes

    def switched(self, step: int, to: str, ring_fill: float) -> None:
        with self._lock:
            self.switches.append({"step": step, "to": to, "ring_fill": round(ring_fill, 4)})

    def written(self, hook: str, n: int, nbytes: int) -> None:
        with self._lock:
            h = self.hooks[hook]
            h["written"] += n
            h["in_flight"] -= n
            self.bytes_written += nbytes

    def committed(self, rows: dict[str, int]) -> None:
        """The sink committed these rows (per hook) of those written to it."""
        with self._lock:
            for hook, n in rows.items():
                self.hooks[hook]["committed"] += n

    def error(self, message: str) -> None:
        with self._lock:
            if message not in self.errors:
                self.errors.append(message)

    def snapshot(self, ring=None) -> dict:
        with self._lock:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            snap = {
                "hooks": {k: dict(v) for k, v in self.hooks.items()},
                "drop_reasons": dict(self.drop_reasons),
                "dropped_by_request": dict(self.dropped_by_request),
                "not_computed": dict(self.not_computed),
                "degrade_switches": list(self.switches),
                "bytes_captured": self.bytes_captured,
                "bytes_drained": self.bytes_drained,
                "bytes_written": self.bytes_written,
                "frames": self.frames,
                "steps": self.steps,
                "elapsed_s": elapsed,
                "drain_mb_s": self.bytes_drained / elapsed / 1e6,
                "sink_mb_s": self.bytes_written / elapsed / 1e6,
                "errors": list(self.errors),
            }
        snap["rows"] = {c: sum(h[c] for h in snap["hooks"].values()) for c in self.COUNTERS}
        if ring is not None:
            snap["ring"] = {"bytes": ring.capacity, "fill": ring.fill(), "high_water_bytes": ring.high_water,
                            "waits": ring.waits}
        return snap
