"""Row filters from the spec: tokens, requests, steps. Hook selection happens at arm time
(unselected hooks have no capture point at all), so it is not here."""
from __future__ import annotations

import hashlib

import numpy as np

from dmi.ring.frames import DECODE, PREFILL, RowTable


class RowFilter:
    def __init__(self, spec):
        self.tokens = spec.tokens
        self.ids = set(spec.requests.ids) if spec.requests.ids is not None else None
        self.sample = spec.requests.sample
        self.seed = spec.requests.seed
        self.stride = spec.steps.stride
        self.warmup = spec.steps.warmup
        self._sampled: dict[str, bool] = {}

    def step_selected(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.stride == 0

    def request_selected(self, rid: str) -> bool:
        hit = self._sampled.get(rid)
        if hit is None:
            hit = self.ids is None or rid in self.ids
            if hit and self.sample < 1.0:
                # A hash, not a random draw: the same request is chosen in every run and every worker.
                h = hashlib.blake2b(f"{self.seed}:{rid}".encode(), digest_size=8).digest()
                hit = int.from_bytes(h, "little") / 2**64 < self.sample
            self._sampled[rid] = hit
        return hit

    def keep(self, step: int, rows: RowTable) -> np.ndarray:
        real = rows.request >= 0
        if not self.step_selected(step):
            return np.zeros_like(real)
        keep = real.copy()
        if self.ids is not None or self.sample < 1.0:
            chosen = np.array([self.request_selected(r) for r in rows.request_ids] + [False], dtype=bool)
            keep &= chosen[rows.request]  # index -1 (padding) hits the trailing False
        if self.tokens == "prefill":
            keep &= rows.phase == PREFILL
        elif self.tokens == "decode":
            keep &= rows.phase == DECODE
        elif self.tokens == "last":
            keep &= _last_of_each_request(rows)
        return keep


def _last_of_each_request(rows: RowTable) -> np.ndarray:
    """True at the last row of each request in this step (rows of a request are in order)."""
    out = np.zeros(rows.request.shape, dtype=bool)
    idx = np.nonzero(rows.request >= 0)[0]
    if idx.size:
        # first occurrence in the reversed order = last occurrence in order
        _, first_rev = np.unique(rows.request[idx][::-1], return_index=True)
        out[idx[idx.size - 1 - first_rev]] = True
    return out
