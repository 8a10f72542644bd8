"""In-memory sink: keeps the rows in host memory for a notebook, within a stated byte budget.

    dmi.CaptureSpec(hooks=..., sink={"kind": "memory", "max_bytes": 512 * 2**20})
    sink="memory" means the default budget (DEFAULT_MAX_BYTES).

Read it with `dmi.reader.memory.cache_of(session)` (session.cache) or `sink.run()`: the same
API as a file opened with dmi.open.

Above the budget: a sink cannot see the session's overload policy (it runs after the drain,
which has already freed the ring), so it cannot block the engine. Rows beyond the budget are
refused: they are recorded as gaps with reason "memory_budget" and moved from "written" to
"dropped" in the run's stats, so nothing goes missing silently. Pick a budget that holds the
run, or a file/dataset sink for runs bigger than memory.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta, Sink, block_rows

DEFAULT_MAX_BYTES = 1 << 30
BUDGET_REASON = "memory_budget"


@dataclass
class HookRows:
    info: HookInfo
    data: list[np.ndarray] = field(default_factory=list)
    request: list[np.ndarray] = field(default_factory=list)   # int32 indices into MemorySink.requests
    position: list[np.ndarray] = field(default_factory=list)
    step: list[np.ndarray] = field(default_factory=list)
    rows: int = 0


class MemorySink(Sink):
    commits_on_write = True   # a reader sees a row as soon as write() returns

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            from dmi.errors import SpecError

            raise SpecError("sink.max_bytes", f"must be a positive number of bytes, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.lock = threading.Lock()
        self.meta: RunMeta | None = None
        self.hooks: dict[str, HookRows] = {}
        self.requests: list[str] = []
        self._request_index: dict[str, int] = {}
        self.gaps: list[dict[str, Any]] = []
        self.refused: dict[str, int] = {}          # hook -> rows refused for the budget
        self.stats: dict[str, Any] = {}
        self.complete = False
        self.closed = False
        self.generation = 0                        # bumped on every change, for readers' caches

    def open(self, meta: RunMeta) -> None:
        if self.meta is not None:
            raise RuntimeError("MemorySink is already open")
        self.meta = meta

    def write(self, block: RowBlock) -> None:
        data = np.asarray(block.data)
        n = block_rows(block)
        if n == 0:
            return
        row_bytes = max(1, data.nbytes // n)
        pos = np.asarray(block.position, dtype=np.int64).reshape(n)
        step = np.asarray(block.step, dtype=np.int64).reshape(n)
        with self.lock:
            keep = min(n, max(0, self.max_bytes - self.bytes) // row_bytes)
            if keep < n:
                self._gap_locked(block.hook.name, block.request[keep:], pos[keep:], step[keep:], BUDGET_REASON)
                self.refused[block.hook.name] = self.refused.get(block.hook.name, 0) + n - keep
            if keep:
                h = self.hooks.get(block.hook.name)
                if h is None:
                    h = self.hooks[block.hook.name] = HookRows(info=copy.copy(block.hook))
                # A block is handed over (RowBlock): kept as it is, not copied.
                h.data.append(data[:keep])
                h.request.append(self._indices(block.request[:keep]))
                h.position.append(pos[:keep].copy())
                h.step.append(step[:keep].copy())
                h.rows += keep
                self.bytes += int(data[:keep].nbytes)
            self.generation += 1

    def write_gaps(self, gaps: GapBlock) -> None:
        with self.lock:
            self._gap_locked(gaps.hook, gaps.request, np.asarray(gaps.position).reshape(-1),
                             np.asarray(gaps.step).reshape(-1), gaps.reason)
            self.generation += 1

    def _gap_locked(self, hook: str, requests, pos: np.ndarray, step: np.ndarray, reason: str) -> None:
        self._indices(list(requests))
        self.gaps.extend({"hook": hook, "request": r, "position": int(p), "step": int(s), "reason": reason}
                         for r, p, s in zip(requests, pos.tolist(), step.tolist()))

    def _indices(self, requests: list[str]) -> np.ndarray:
        out = np.empty(len(requests), dtype=np.int32)
        for i, rid in enumerate(requests):
            j = self._request_index.get(rid)
            if j is None:
                j = self._request_index[rid] = len(self.requests)
                self.requests.append(rid)
            out[i] = j
        return out

    def close(self, stats: dict[str, Any], complete: bool = True) -> None:
        with self.lock:
            self.stats = _with_refusals(copy.deepcopy(stats or {}), self.refused)
            self.complete = bool(complete)
            self.closed = True
            self.generation += 1

    def run(self):
        """A reader over what this sink holds (live while the session runs)."""
        from dmi.reader.memory import MemoryRun

        return MemoryRun(self)


def _with_refusals(stats: dict[str, Any], refused: dict[str, int]) -> dict[str, Any]:
    """Rows the session counted as written but the budget refused are dropped rows."""
    if not refused:
        return stats
    hooks = stats.setdefault("hooks", {})
    for hook, n in refused.items():
        c = hooks.setdefault(hook, {})
        c["written"] = c.get("written", 0) - n
        if "committed" in c:
            c["committed"] -= n
        c["dropped"] = c.get("dropped", 0) + n
    reasons = stats.setdefault("drop_reasons", {})
    reasons[BUDGET_REASON] = reasons.get(BUDGET_REASON, 0) + sum(refused.values())
    if hooks and all(isinstance(c, dict) for c in hooks.values()):
        counters = {k for c in hooks.values() for k, v in c.items() if isinstance(v, int)}
        stats["rows"] = {k: sum(c.get(k, 0) for c in hooks.values()) for k in sorted(counters)}
    return stats
