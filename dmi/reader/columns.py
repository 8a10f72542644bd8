"""Runs whose rows a reader holds as whole columns (the memory sink, a dataset read into
memory): one implementation of the row reads and of gap queries on top of per-hook columns,
so `MemoryRun` and `DatasetRun` only say where the columns come from."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dmi.reader.run import _Index, _torch_dtype, _unknown, natural_key
from dmi.reader.views import RunViews

# (data [n, *row], index by (request, position), step per row), as built by `columns`.
Columns = tuple[np.ndarray, _Index, np.ndarray]


class ColumnRun(RunViews):
    """A subclass provides `requests`, `meta`, `dtype(hook)`, `ragged(hook)`, and:
    `_stored_hooks()` (the hooks that hold rows), `_columns(hook)` (Columns, raising for an
    unknown hook), `_request_table()` (request id -> index the columns use) and `_all_gaps()`
    (gap dicts with string request ids)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hooks(self) -> list[str]:
        """Stored hooks in the spec's order, then any others in natural order."""
        stored = list(self._stored_hooks())
        order = self.meta.get("hooks")
        first = [h for h in order if h in stored] if isinstance(order, list) else []
        return first + sorted(set(stored) - set(first), key=natural_key)

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
        """Rows start:stop in the order they were stored."""
        return self._tensor(self._columns(hook)[0][start:stop], hook)

    def shape(self, hook: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._columns(hook)[0].shape[1:])

    def data_bytes(self, hook: str) -> int:
        return int(self._columns(hook)[0].nbytes)

    def gaps(self, hook: str | None = None, request: str | int | None = None) -> list[dict[str, Any]]:
        """Dropped rows, as dicts with hook, request, position, step and reason."""
        gaps = self._all_gaps()
        rid = self._gap_query(hook, request, {g["hook"] for g in gaps})
        return [dict(g) for g in gaps if (hook is None or g["hook"] == hook) and (rid is None or g["request"] == rid)]

    # -- internals ---------------------------------------------------------------------------

    def _request_idx(self, request: str | int) -> int:
        rid = self.request_id(request)
        i = self._request_table().get(rid)
        if i is None:
            raise _unknown("request", rid, self.requests)
        return i

    def _tensor(self, a: np.ndarray, hook: str) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        want = _torch_dtype(self.dtype(hook))
        if want is not None and want != t.dtype and want.itemsize == t.dtype.itemsize:
            t = t.view(want)   # bfloat16 and float8 arrive as same-width bit patterns
        return t


def columns(datas: list[np.ndarray], requests: list[np.ndarray], positions: list[np.ndarray],
            steps: list[np.ndarray], ragged: bool, empty: np.ndarray) -> Columns:
    """Join a hook's row parts (requests as indices) into Columns; `empty` is its data when
    there are no parts."""
    data = join_rows(datas, ragged) if datas else empty
    req = np.concatenate(requests).astype(np.int64) if requests else np.zeros(0, np.int64)
    pos = np.concatenate(positions).astype(np.int64) if positions else np.zeros(0, np.int64)
    step = np.concatenate(steps).astype(np.int64) if steps else np.zeros(0, np.int64)
    order = np.lexsort((pos, req))   # stable: duplicate (request, position) rows keep their order
    return data, _Index(order=order, requests=req[order], positions=pos[order]), step


def join_rows(parts: list[np.ndarray], ragged: bool) -> np.ndarray:
    """Concatenate row blocks; ragged ones zero-padded to the widest last dim."""
    if not ragged:
        return np.concatenate(parts)
    w = max(p.shape[-1] for p in parts)
    out = np.zeros((sum(len(p) for p in parts), *parts[0].shape[1:-1], w), dtype=parts[0].dtype)
    i = 0
    for p in parts:
        out[i:i + len(p), ..., : p.shape[-1]] = p
        i += len(p)
    return out
