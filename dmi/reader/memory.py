"""Read rows held in memory (the memory sink) with the Run API, and `cache_of(session)`, the
function behind `session.cache`."""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from dmi.reader.columns import ColumnRun, Columns, columns
from dmi.reader.run import _unknown
from dmi.sinks.memory import MemorySink


class MemoryRun(ColumnRun):
    """A run held by a MemorySink: requests, hooks, get, positions, steps, stats, gaps, stack,
    run[hook]. Live while the session runs (what the drain has handed over so far)."""

    def __init__(self, sink: MemorySink) -> None:
        self._sink = sink
        self._seen = -1
        self._cols: dict[str, Columns] = {}

    def __repr__(self) -> str:
        return (f"<dmi.MemoryRun {'complete' if self.complete else 'live'} requests={len(self.requests)} "
                f"hooks={len(self.hooks)} {self._sink.bytes / 1e6:.1f}/{self._sink.max_bytes / 1e6:.1f} MB>")

    def close(self) -> None:
        """Nothing to release; the rows live as long as the sink."""

    def refresh(self) -> MemoryRun:
        return self

    # -- metadata --------------------------------------------------------------------------

    @property
    def requests(self) -> list[str]:
        with self._sink.lock:
            return list(self._sink.requests)

    @property
    def meta(self) -> dict[str, Any]:
        m = self._sink.meta
        if m is None:
            return {"complete": False}
        out = {"dmi_version": m.dmi_version, "engine": m.engine, "model": m.model,
               "model_config": copy.deepcopy(m.model_config), "spec": json.loads(m.spec_json) if m.spec_json else {},
               **copy.deepcopy(m.extra)}
        out["complete"] = self.complete
        return out

    @property
    def complete(self) -> bool:
        return self._sink.closed and self._sink.complete

    @property
    def spec(self) -> dict[str, Any]:
        return self.meta.get("spec") or {}

    @property
    def stats(self) -> dict[str, Any]:
        with self._sink.lock:
            stats = copy.deepcopy(self._sink.stats)
            stats["memory"] = {"max_bytes": self._sink.max_bytes, "bytes": self._sink.bytes,
                               "refused_rows": sum(self._sink.refused.values())}
        return stats

    def dtype(self, hook: str) -> str:
        return self._hook(hook).info.dtype

    def ragged(self, hook: str) -> bool:
        return bool(self._hook(hook).info.ragged)

    def source(self, hook: str) -> str:
        return self._hook(hook).info.source

    def shard(self, hook: str):
        return self._hook(hook).info.shard

    def num_rows(self, hook: str) -> int:
        return self._hook(hook).rows

    def nbytes(self, hook: str) -> int:
        return self.data_bytes(hook)

    # -- what ColumnRun reads ----------------------------------------------------------------

    def _stored_hooks(self) -> list[str]:
        with self._sink.lock:
            return list(self._sink.hooks)

    def _request_table(self) -> dict[str, int]:
        return self._sink._request_index

    def _all_gaps(self) -> list[dict[str, Any]]:
        with self._sink.lock:
            return list(self._sink.gaps)

    def _hook(self, hook: str):
        with self._sink.lock:
            h = self._sink.hooks.get(hook)
        if h is None:
            raise _unknown("hook", hook, self.hooks)
        return h

    def _columns(self, hook: str) -> Columns:
        """The hook's rows joined into arrays plus its (request, position) index; rebuilt only
        after the sink took more rows."""
        h = self._hook(hook)
        with self._sink.lock:
            if self._seen != self._sink.generation:
                self._cols.clear()
                self._seen = self._sink.generation
            got = self._cols.get(hook)
            if got is None:
                got = self._cols[hook] = columns(list(h.data), list(h.request), list(h.position), list(h.step),
                                                 bool(h.info.ragged), np.zeros((0, *h.info.row_shape)))
        return got


def cache_of(session):
    """What `session.cache` returns: the session's rows with the Run API. A memory sink's rows
    are read in place (after a flush, so every step run so far is there); a file sink's output
    is flushed and opened with dmi.open."""
    sink = session.sink
    if not session.closed:
        session.flush()
    if isinstance(sink, MemorySink):
        return sink.run()
    path = getattr(sink, "path", None)
    if path is None:
        raise TypeError(f"session.cache reads a memory or file sink; this session writes to a "
                        f"{type(sink).__name__}, which has no path to open")
    import dmi

    return dmi.open(path)


__all__ = ["MemoryRun", "cache_of"]
