"""Read rows held in memory (the memory sink) with the Run API, and `cache_of(session)`, the
function behind `session.cache`."""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch

from dmi.reader.run import _Index, _torch_dtype, _unknown, natural_key
from dmi.reader.views import RunViews
from dmi.sinks.memory import MemorySink


class MemoryRun(RunViews):
    """A run held by a MemorySink: requests, hooks, get, positions, steps, stats, gaps, stack,
    run[hook]. Live while the session runs (what the drain has handed over so far)."""

    def __init__(self, sink: MemorySink) -> None:
        self._sink = sink
        self._seen = -1
        self._cols: dict[str, tuple[np.ndarray, _Index, np.ndarray]] = {}

    def __repr__(self) -> str:
        return (f"<dmi.MemoryRun {'complete' if self.complete else 'live'} requests={len(self.requests)} "
                f"hooks={len(self.hooks)} {self._sink.bytes / 1e6:.1f}/{self._sink.max_bytes / 1e6:.1f} MB>")

    def __enter__(self) -> MemoryRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
    def hooks(self) -> list[str]:
        with self._sink.lock:
            stored = list(self._sink.hooks)
        order = self.meta.get("hooks")
        first = [h for h in order if h in stored] if isinstance(order, list) else []
        return first + sorted(set(stored) - set(first), key=natural_key)

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

    def shape(self, hook: str) -> tuple[int, ...]:
        data = self._columns(hook)[0]
        return tuple(int(d) for d in data.shape[1:])

    def ragged(self, hook: str) -> bool:
        return bool(self._hook(hook).info.ragged)

    def source(self, hook: str) -> str:
        return self._hook(hook).info.source

    def shard(self, hook: str):
        return self._hook(hook).info.shard

    def num_rows(self, hook: str) -> int:
        return self._hook(hook).rows

    def data_bytes(self, hook: str) -> int:
        return int(self._columns(hook)[0].nbytes)

    nbytes = data_bytes

    # -- rows --------------------------------------------------------------------------------

    def get(self, hook: str, request: str | int) -> torch.Tensor:
        data, idx, _ = self._columns(hook)
        req = self._request_idx(request)
        rows = idx.rows_of(req)
        out = data[rows]
        if self.ragged(hook) and rows.size:
            out = out[..., : min(int(idx.positions_of(req).max()) + 1, data.shape[-1])]
        return self._tensor(out, hook)

    def positions(self, hook: str, request: str | int) -> torch.Tensor:
        _, idx, _ = self._columns(hook)
        return torch.from_numpy(idx.positions_of(self._request_idx(request)).copy())

    def steps(self, hook: str, request: str | int) -> torch.Tensor:
        _, idx, step = self._columns(hook)
        return torch.from_numpy(step[idx.rows_of(self._request_idx(request))])

    def read_rows(self, hook: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._tensor(self._columns(hook)[0][start:stop], hook)

    def gaps(self, hook: str | None = None, request: str | int | None = None) -> list[dict[str, Any]]:
        with self._sink.lock:
            gaps = list(self._sink.gaps)
        if hook is not None and hook not in self.hooks and not any(g["hook"] == hook for g in gaps):
            raise _unknown("hook", hook, self.hooks)
        rid = None if request is None else self.request_id(request)
        if rid is not None and rid not in self.requests:
            raise _unknown("request", rid, self.requests)
        return [dict(g) for g in gaps if (hook is None or g["hook"] == hook) and (rid is None or g["request"] == rid)]

    # -- internals ---------------------------------------------------------------------------

    def _hook(self, hook: str):
        with self._sink.lock:
            h = self._sink.hooks.get(hook)
        if h is None:
            raise _unknown("hook", hook, self.hooks)
        return h

    def _request_idx(self, request: str | int) -> int:
        rid = self.request_id(request)
        with self._sink.lock:
            i = self._sink._request_index.get(rid)
        if i is None:
            raise _unknown("request", rid, self.requests)
        return i

    def _columns(self, hook: str) -> tuple[np.ndarray, _Index, np.ndarray]:
        """The hook's rows joined into arrays plus its (request, position) index; rebuilt only
        after the sink took more rows."""
        h = self._hook(hook)
        with self._sink.lock:
            if self._seen != self._sink.generation:
                self._cols.clear()
                self._seen = self._sink.generation
            got = self._cols.get(hook)
            if got is None:
                parts = list(h.data)
                data = _join(parts, bool(h.info.ragged)) if parts else np.zeros((0, *h.info.row_shape))
                req = np.concatenate(h.request).astype(np.int64) if h.request else np.zeros(0, np.int64)
                pos = np.concatenate(h.position) if h.position else np.zeros(0, np.int64)
                step = np.concatenate(h.step) if h.step else np.zeros(0, np.int64)
                order = np.lexsort((pos, req))
                got = self._cols[hook] = (data, _Index(order=order, requests=req[order], positions=pos[order]), step)
        return got

    def _tensor(self, a: np.ndarray, hook: str) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        want = _torch_dtype(self.dtype(hook))
        if want is not None and want != t.dtype and want.itemsize == t.dtype.itemsize:
            t = t.view(want)   # bfloat16 and float8 arrive as same-width bit patterns
        return t


def _join(parts: list[np.ndarray], ragged: bool) -> np.ndarray:
    if not ragged:
        return np.concatenate(parts)
    w = max(p.shape[-1] for p in parts)
    out = np.zeros((sum(len(p) for p in parts), *parts[0].shape[1:-1], w), dtype=parts[0].dtype)
    i = 0
    for p in parts:
        out[i:i + len(p), ..., : p.shape[-1]] = p
        i += len(p)
    return out


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
