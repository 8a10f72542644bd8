"""Frames: what one engine step captures, planned from the adapter's row table.

The adapter says who is in the batch (request, position, phase per token row); the
plan turns that, after the row filters, into the source rows each capture copies and
the row table the drain attaches to them. The frame ring carries slot descriptors from
the producer to the drain thread, in the order the payload was written.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

PREFILL, DECODE = 0, 1


@dataclass
class RowTable:
    """Who each token row of a step belongs to. Rows are the step's tokens in [batch, tokens]
    order (an engine with a flat batch uses batch=1)."""

    batch: int
    tokens: int
    request_ids: list[str]       # the requests present in this step
    request: np.ndarray          # int32 [batch*tokens]: index into request_ids, -1 for padding
    position: np.ndarray         # int64 [batch*tokens]: position within the request, from 0
    phase: np.ndarray            # int8 [batch*tokens]: PREFILL or DECODE
    key_mask: np.ndarray | None = None   # bool [batch, keys]: real keys, for attention patterns
    # Rows whose request may have ended before this step, known only once the step ran on the
    # device (GPU, no sync): late.alive(step) -> bool [batch] or None, called by the drain.
    late: Any = None


@dataclass
class RowSelection:
    """The rows of one hook tensor that are kept, for a tensor holding the last `t` tokens."""

    src_rows: torch.Tensor       # int64 [n]: rows of the hook tensor (viewed [batch*t, ...]) to copy
    token_idx: np.ndarray        # int64 [n]: the matching rows of the step's RowTable
    produced: int                # real (non-padding) rows the engine computed for this hook
    filtered: int                # real rows the filters left out
    lost_idx: np.ndarray         # RowTable rows the filters keep but `degrade` gave up (dropped)
    src_dev: Any = None          # GPU: src_rows uploaded to the device, once per step


@dataclass
class StepPlan:
    step: int
    rows: RowTable
    keep: np.ndarray             # bool [batch*tokens]: real rows the filters keep
    reduced: np.ndarray | None = None  # while degraded: the rows the fallback keeps
    stream: Any = None           # GPU: the engine's stream the step's captures were enqueued on
    done_event: Any = None       # GPU: recorded on `stream` when the step ended (its frame sealed)
    _by_t: dict[tuple[int, bool], RowSelection] = field(default_factory=dict)

    def select(self, t: int, in_fallback: bool = True) -> RowSelection:
        """Rows kept for a hook tensor with `t` tokens per batch row: the last t tokens of each
        batch row (generate computes logits for the last token only). While degraded, only
        the fallback's rows of the fallback's hooks are kept."""
        key = (t, in_fallback)
        sel = self._by_t.get(key)
        if sel is None:
            B, T = self.rows.batch, self.rows.tokens
            tok = (np.arange(B)[:, None] * T + np.arange(T - t, T)[None, :]).reshape(-1)
            real = self.rows.request[tok] >= 0
            keep = self.keep[tok]
            kept = keep if self.reduced is None else (self.reduced[tok] if in_fallback else np.zeros_like(keep))
            src = np.nonzero(kept)[0]
            sel = RowSelection(torch.from_numpy(src.astype(np.int64)), tok[src], int(real.sum()),
                               int(real.sum() - keep.sum()), tok[keep & ~kept])
            self._by_t[key] = sel
        return sel

    def select_rows(self, token_idx: np.ndarray, in_fallback: bool = True) -> RowSelection:
        """Rows kept for a tensor whose row k is the step's RowTable row token_idx[k] (-1: a
        padding row), e.g. one logits row per request at its last token."""
        tok = np.asarray(token_idx, dtype=np.int64)
        valid = tok >= 0
        t = np.where(valid, tok, 0)
        real = valid & (self.rows.request[t] >= 0)
        keep = real & self.keep[t]
        kept = keep if self.reduced is None else (keep & self.reduced[t] if in_fallback else np.zeros_like(keep))
        src = np.nonzero(kept)[0]
        return RowSelection(torch.from_numpy(src.astype(np.int64)), t[src], int(real.sum()),
                            int(real.sum() - keep.sum()), t[keep & ~kept])


@dataclass
class Slot:
    """One hook's rows of one step, written at [offset, offset+nbytes) of the payload ring."""

    plan: StepPlan
    hook: int
    offset: int
    nbytes: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    token_idx: np.ndarray
    pattern_batch: np.ndarray | None = None  # batch row per kept row, for attention-pattern compaction


@dataclass
class Marker:
    """A control item through the pipeline: 'flush' waits until everything before it is written."""

    kind: str
    done: Any = None


class FrameRing:
    """The host frame ring: a bounded FIFO of slot descriptors and markers.

    The producer appends without waking anyone; the drain is woken once per step when the
    frame is sealed (or when the ring is half full, or a marker arrives) and takes
    everything pending in one go. On a CPU host every wake-up of another Python thread
    costs the engine's thread a GIL hand-off, so one per step, not one per hook.
    """

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._sealed = False

    def put(self, item) -> None:
        with self._cv:
            while len(self._items) >= self.capacity:
                self._sealed = True
                self._cv.notify_all()
                self._cv.wait()
            self._items.append(item)
            if isinstance(item, Marker) or len(self._items) >= self.capacity // 2:
                self._sealed = True
                self._cv.notify_all()

    def seal(self) -> None:
        """The step's frame is complete: let the drain take it."""
        with self._cv:
            if self._items:
                self._sealed = True
                self._cv.notify_all()

    def take_all(self, timeout: float | None = None) -> list:
        """Everything pending, once sealed (or after `timeout` with anything pending)."""
        with self._cv:
            if not (self._sealed and self._items):
                self._cv.wait_for(lambda: self._sealed and self._items, timeout)
            items = list(self._items)
            self._items.clear()
            self._sealed = False
            self._cv.notify_all()
            return items

    def __len__(self) -> int:
        return len(self._items)
