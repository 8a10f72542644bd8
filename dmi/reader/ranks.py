"""A tensor-parallel run read as one: rank 0's file plus "<path>.rank<r>" for each other rank.

Under tensor parallelism each rank holds a slice of some rows (attention heads, MLP features),
a partial sum of some (a row-parallel projection's output before its all-reduce, shard dim -1),
and the whole of others (the residual stream). Rank 0 captures every hook, its slices included;
the other ranks capture only their slices. A sliced hook's group carries `shard` = (dim, start,
stop, full), so rows are put back together from the files alone, whatever engine wrote them.

Ranks run the same steps but each drains on its own, so one rank may have dropped a row that
another kept (each records its drops in its own gaps), or, while live, committed less: a merged
request holds the positions every rank holds.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmi.reader.run import Run
from dmi.tp import PARTIAL, rank_path
from dmi.reader.views import RunViews

Shard = tuple[int, int, int, int]


class ShardedRun(RunViews):
    """Reads like a Run; hooks sliced across ranks come back whole. `ranks[r]` is rank r's Run."""

    def __init__(self, first: Run, tp_size: int, salvage: bool = False) -> None:
        self.tp_size = tp_size
        self.ranks: list[Run] = [first]
        self._held: dict[str, list[tuple[Run, Shard]]] = {}
        try:
            for r in range(1, tp_size):
                other = rank_path(first.path, r)
                if not Path(other).exists():
                    raise FileNotFoundError(f"{first.path!r} was captured by {tp_size} tensor-parallel ranks, but "
                                            f"rank {r}'s file {other!r} is missing; keep the rank files beside the "
                                            f"first, or read rank 0 alone with dmi.open(path, merge_ranks=False)")
                self.ranks.append(Run(other, salvage=salvage))
        except BaseException:
            self.close()
            raise

    def __getattr__(self, name: str) -> Any:
        # Everything not about sliced rows (path, file, meta, spec, requests, hooks, dtype, ...)
        # is rank 0's: it captured every hook and saw every request.
        if name == "ranks":
            raise AttributeError(name)
        return getattr(self.ranks[0], name)

    def close(self) -> None:
        for r in self.ranks:
            r.close()

    def refresh(self) -> ShardedRun:
        """Run.refresh for every rank's file."""
        for r in self.ranks:
            r.refresh()
        self._held.clear()
        return self

    def __enter__(self) -> ShardedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self.ranks[0])[:-1] + f" tp_size={self.tp_size}>"

    @property
    def complete(self) -> bool:
        return all(r.complete for r in self.ranks)

    @property
    def stats(self) -> dict[str, Any]:
        """Rank 0's accounting, with every rank's under "tp_ranks"."""
        per_rank = [r.stats for r in self.ranks]
        return {**per_rank[0], "tp_ranks": per_rank}

    def _slices(self, hook: str) -> list[tuple[Run, Shard]] | None:
        """(rank, shard) of each rank holding a slice of the hook; None for a whole-row hook."""
        held = self._held.get(hook)
        if held is None:
            if self.ranks[0].shard(hook) is None:
                held = []
            else:
                held = [(r, r.shard(hook)) for r in self.ranks if hook in r.hooks and r.holds(hook)]
                _check_covered(hook, [s for _, s in held])
            self._held[hook] = held
        return held or None

    def shard(self, hook: str) -> None:
        """Merged rows are whole (each rank's slice: ranks[r].shard(hook))."""
        self.ranks[0].shard(hook)  # unknown hook: raises
        return None

    # -- sizes -------------------------------------------------------------------------------

    def shape(self, hook: str) -> tuple[int, ...]:
        shape = self.ranks[0].shape(hook)
        held = self._slices(hook)
        if held is None:
            return shape
        dim, _, _, full = held[0][1]
        if dim == PARTIAL:  # partial sums: each rank's row is whole-shaped
            return shape
        return (*shape[:dim], full, *shape[dim + 1:])

    def num_rows(self, hook: str) -> int:
        held = self._slices(hook)
        return self.ranks[0].num_rows(hook) if held is None else min(r.num_rows(hook) for r, _ in held)

    def nbytes(self, hook: str) -> int:
        held = self._slices(hook)
        return self.ranks[0].nbytes(hook) if held is None else sum(r.nbytes(hook) for r, _ in held)

    def data_bytes(self, hook: str) -> int:
        held = self._slices(hook)
        return self.ranks[0].data_bytes(hook) if held is None else sum(r.data_bytes(hook) for r, _ in held)

    # -- rows --------------------------------------------------------------------------------

    def _common(self, hook: str, request: str, held) -> list[np.ndarray]:
        """Per holding rank, indices into its position-ordered rows of the positions all ranks hold."""
        positions = [r.positions(hook, request).numpy() if request in r.requests else np.empty(0, np.int64)
                     for r, _ in held]
        if all(np.array_equal(positions[0], p) for p in positions[1:]):
            return [np.arange(len(p)) for p in positions]
        firsts = [np.unique(p, return_index=True) for p in positions]
        common = functools.reduce(np.intersect1d, [u for u, _ in firsts])
        return [idx[np.isin(u, common)] for u, idx in firsts]

    def get(self, hook: str, request: str | int) -> torch.Tensor:
        request = self.request_id(request)
        held = self._slices(hook)
        if held is None:
            return self.ranks[0].get(hook, request)
        picks = self._common(hook, request, held)
        if not len(picks[0]):
            return _paste([(self.ranks[0].get(hook, request)[:0], held[0][1])])
        return _paste([(r.get(hook, request)[torch.from_numpy(p)], s) for (r, s), p in zip(held, picks)])

    def positions(self, hook: str, request: str) -> torch.Tensor:
        return self._rank0_column("positions", hook, request)

    def steps(self, hook: str, request: str) -> torch.Tensor:
        return self._rank0_column("steps", hook, request)

    def _rank0_column(self, column: str, hook: str, request: str | int) -> torch.Tensor:
        request = self.request_id(request)
        values = getattr(self.ranks[0], column)(hook, request)
        held = self._slices(hook)
        if held is None:
            return values
        return values[torch.from_numpy(self._common(hook, request, held)[0])]

    def read_rows(self, hook: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        held = self._slices(hook)
        if held is None:
            return self.ranks[0].read_rows(hook, start, stop)
        stop = self.num_rows(hook) if stop is None else min(stop, self.num_rows(hook))
        keys = [_row_keys(r, hook, start, stop) for r, _ in held]
        if not all(k == keys[0] for k in keys[1:]):
            raise ValueError(f"hook {hook!r}: the ranks' files hold different rows in {start}:{stop} (one rank "
                             f"dropped rows another kept); read it per request with get(hook, request)")
        return _paste([(r.read_rows(hook, start, stop), s) for r, s in held])

    def gaps(self, hook: str | None = None, request: str | None = None) -> list[dict[str, Any]]:
        """Every rank's gaps; one a rank shares with rank 0 (a prefix-cache hit) is listed once."""
        request = None if request is None else self.request_id(request)
        out = self.ranks[0].gaps(hook, request)   # unknown hook or request: rank 0 raises
        seen = {_gap_key(g) for g in out}
        for r in self.ranks[1:]:
            try:
                more = r.gaps(hook, request)
            except KeyError:                      # this rank holds nothing of that hook or request
                continue
            for g in more:
                if _gap_key(g) not in seen:
                    seen.add(_gap_key(g))
                    out.append(g)
        return out


def _gap_key(g: dict[str, Any]) -> tuple:
    return g["hook"], g["request"], g["position"], g["reason"]


def _check_covered(hook: str, shards: list[Shard]) -> None:
    dim, full = shards[0][0], shards[0][3]
    covered = np.zeros(full, dtype=bool)
    for _, start, stop, _ in shards:
        covered[start:stop] = True
    if not covered.all():
        gap = np.flatnonzero(~covered)
        raise ValueError(f"hook {hook!r}: no rank file holds slice {int(gap[0])}:{int(gap[-1]) + 1} of row dim {dim} "
                         f"(size {full}); a rank has captured nothing of it yet")


def _row_keys(run: Run, hook: str, start: int, stop: int) -> list[tuple[str, int]]:
    grp = run.file["hooks"][hook]
    names = run.requests
    return list(zip((names[i] for i in grp["request"][start:stop]), grp["position"][start:stop].tolist()))


def _paste(parts: list[tuple[torch.Tensor, Shard]]) -> torch.Tensor:
    """Whole rows from the ranks' slices; where slices overlap (replicated kv heads) the first wins.
    Partial sums (dim PARTIAL) add up."""
    first, (dim, _, _, full) = parts[0]
    if dim == PARTIAL:
        return functools.reduce(torch.add, (t.float() for t, _ in parts)).to(first.dtype)
    d = dim + 1  # after the row index
    out = first.new_zeros((*first.shape[:d], full, *first.shape[d + 1:]))
    filled = np.zeros(full, dtype=bool)
    for t, (_, start, stop, _) in parts:
        if not filled[start:stop].all():
            out.narrow(d, start, stop - start).copy_(t)
            filled[start:stop] = True
    return out


def open_ranks(first: Run, salvage: bool = False) -> Run | ShardedRun:
    """`first` alone, or with its sibling rank files when it was captured under tensor parallelism."""
    tp_size = int(first.meta.get("tp_size", 1) or 1)
    if tp_size <= 1 or int(first.meta.get("tp_rank", 0) or 0) != 0:
        return first
    return ShardedRun(first, tp_size, salvage=salvage)

