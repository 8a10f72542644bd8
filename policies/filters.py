"""Row filters from the spec: tokens, requests, steps. Hook selection happens at arm time
(unselected hooks have no capture point at all), so it is not here.

Filters run at begin_step, once per step, on the adapter's row table: the capture op then
copies only kept rows. (Under CUDA graphs, where the copy is fixed at capture time, the
same mask is applied by the drain instead.)
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from dmi.plan.rows import DECODE, PREFILL, RowTable


class TokenMask:
    """A spec's TokenFilter as a mask over a step's rows."""

    def __init__(self, tokens):
        self.mode = tokens.mode
        self.ranges = np.array(tokens.positions, dtype=np.int64) if tokens.positions else None
        self.every = tokens.every

    def __call__(self, rows: RowTable, keep: np.ndarray) -> np.ndarray:
        keep = keep.copy()
        if self.mode == "prefill":
            keep &= rows.phase == PREFILL
        elif self.mode == "decode":
            keep &= rows.phase == DECODE
        elif self.mode == "last":
            keep &= _last_of_each_request(rows)
        if self.ranges is not None:
            pos = rows.position[:, None]
            keep &= ((pos >= self.ranges[:, 0]) & (pos < self.ranges[:, 1])).any(axis=1)
        if self.every > 1:
            keep &= rows.position % self.every == 0
        return keep


class RowFilter:
    def __init__(self, spec, predicate: Callable[[str], bool] | None = None):
        self.tokens = TokenMask(spec.tokens)
        self.fallback_tokens = TokenMask(spec.degrade.fallback.tokens) if spec.degrade is not None else None
        self.ids = set(spec.requests.ids) if spec.requests.ids is not None else None
        self.sample = spec.requests.sample
        self.seed = spec.requests.seed
        self.predicate = predicate
        self.stride = spec.steps.stride
        self.warmup = spec.steps.warmup
        self._chosen: dict[str, bool] = {}
        # Whether a step's kept rows depend on its rows only through their requests (no token
        # filter, no fallback): then the same request rows in a selected step keep the same rows.
        t = self.tokens
        self.by_request_only = (t.mode == "all" and t.ranges is None and t.every <= 1
                                and self.fallback_tokens is None)

    def step_selected(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.stride == 0

    def request_selected(self, rid: str) -> bool:
        hit = self._chosen.get(rid)
        if hit is None:
            hit = self.ids is None or rid in self.ids
            if hit and self.sample < 1.0:
                # A hash, not a random draw: the same request is chosen in every run and every worker.
                h = hashlib.blake2b(f"{self.seed}:{rid}".encode(), digest_size=8).digest()
                hit = int.from_bytes(h, "little") / 2**64 < self.sample
            if hit and self.predicate is not None:
                hit = bool(self.predicate(rid))
            self._chosen[rid] = hit
        return hit

    def keep(self, step: int, rows: RowTable) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows the spec keeps, rows the degrade fallback keeps or None without one)."""
        real = rows.request >= 0
        if not self.step_selected(step):
            none = np.zeros_like(real)
            return none, (none if self.fallback_tokens is not None else None)
        keep = real.copy()
        if self.ids is not None or self.sample < 1.0 or self.predicate is not None:
            chosen = np.array([self.request_selected(r) for r in rows.request_ids] + [False], dtype=bool)
            keep &= chosen[rows.request]  # index -1 (padding) hits the trailing False
        fallback = self.fallback_tokens(rows, keep) if self.fallback_tokens is not None else None
        keep = self.tokens(rows, keep)
        if fallback is not None:
            fallback &= keep  # the fallback is a subset: never keeps a row the spec would not
        return keep, fallback


def _last_of_each_request(rows: RowTable) -> np.ndarray:
    """True at the last row of each request in this step (rows of a request are in order)."""
    out = np.zeros(rows.request.shape, dtype=bool)
    idx = np.nonzero(rows.request >= 0)[0]
    if idx.size:
        # first occurrence in the reversed order = last occurrence in order
        _, first_rev = np.unique(rows.request[idx][::-1], return_index=True)
        out[idx[idx.size - 1 - first_rev]] = True
    return out
