from __future__ import annotations

import logging
import threading
import traceback

import numpy as np
import torch

from dmi.ring.frames import FrameRing, Marker, Slot
from dmi.sinks.base import GapBlock, RowBlock, Sink

from .copy import copier_for
from .hostqueue import EMPTY, ByteBoundedQueue

log = logging.getLogger("dmi")


# numpy has no bfloat16: bf16 travels as its uint16 bit patterns (lossless), like every
# other dtype as the same-width numpy type.
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float64: np.float64,
       torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
       torch.uint8: np.uint8, torch.bool: np.bool_}


def numpy_dtype(dtype: torch.dtype):
    return _NP[dtype]


def compact_pattern(rows: np.ndarray, slot: Slot) -> np.ndarray:
    """[n, heads, keys] over the step's key columns -> [n, heads, max_pos+1] over the request's
    own keys 0..position, in order (padding keys removed; a causal pattern is 0 beyond)."""
    plan = slot.plan
    pos = plan.rows.position[slot.token_idx]
    width = int(pos.max()) + 1 if pos.size else 1
    out = np.zeros((rows.shape[0], rows.shape[1], width), dtype=rows.dtype)
    mask = plan.rows.key_mask
    for i, (b, p) in enumerate(zip(slot.pattern_batch, pos)):
        cols = np.flatnonzero(mask[b])[: p + 1] if mask is not None else np.arange(p + 1)
        out[i, :, : len(cols)] = rows[i][:, cols]
    return out


def _merge(info, parts: list) -> RowBlock:
    """One row block from consecutive slots of one hook (several steps)."""
    datas = [compact_pattern(rows, slot) if info.ragged else rows for rows, slot in parts]
    if info.ragged:
        width = max(d.shape[-1] for d in datas)
        datas = [np.pad(d, [(0, 0)] * (d.ndim - 1) + [(0, width - d.shape[-1])]) for d in datas]
    request: list[str] = []
    for _, slot in parts:
        table = slot.plan.rows
        ids = table.request_ids
        request += [ids[r] for r in table.request[slot.token_idx]]
    return RowBlock(
        hook=info,
        data=datas[0] if len(datas) == 1 else np.concatenate(datas),
        request=request,
        position=np.concatenate([slot.plan.rows.position[slot.token_idx] for _, slot in parts]).astype(np.int64),
        step=np.concatenate([np.full(len(slot.token_idx), slot.plan.step, dtype=np.int64) for _, slot in parts]),
    )


class Drain:
    """Owns the drain thread (ring -> host) and the sink thread (host -> sink)."""

    def __init__(self, ring, frames: FrameRing, sink: Sink, accounting, hook_infos: dict,
                 host_bytes: int):
        self.ring = ring
        self.frames = frames
        self.sink = sink
        self.acct = accounting
        self.hook_infos = hook_infos      # hook index -> HookInfo, filled by the session
        self.host = ByteBoundedQueue(host_bytes)
        self.copier = copier_for(ring)
        self.sink_failed: str | None = None
        self._drain = threading.Thread(target=self._drain_loop, name="dmi-drain", daemon=True)
        self._sinker = threading.Thread(target=self._sink_loop, name="dmi-sink", daemon=True)

    def start(self) -> None:
        self._drain.start()
        self._sinker.start()

    def alive(self) -> bool:
        return self._drain.is_alive() and self._sinker.is_alive()

    # -- drain thread -----------------------------------------------------------------
    def _drain_loop(self) -> None:
        while True:
            items = self.frames.take_all(timeout=0.05)
            pending: dict[int, list] = {}  # hook -> [(rows, slot)], merged into one block per hook
            slots: list[Slot] = []
            for item in items:
                if isinstance(item, Slot):
                    slots.append(item)
                    continue
                self._copy_out(slots, pending)
                self._hand_over(pending)  # order: everything before a marker or gap goes first
                self.host.put(item)
                if isinstance(item, Marker) and item.kind == "stop":
                    return
            self._copy_out(slots, pending)
            self._hand_over(pending)

    def _copy_out(self, slots: list[Slot], pending: dict) -> None:
        """One copy per drain wake-up for all slots taken (coalesced on a GPU), then release."""
        if not slots:
            return
        try:
            hosts = self.copier.copy(slots)
        finally:
            for slot in slots:
                self.ring.release(slot.offset)
        for host, slot in zip(hosts, slots):
            self.acct.drained(slot.nbytes)
            rows = host.view(numpy_dtype(slot.dtype)).reshape(len(slot.token_idx), *slot.row_shape)
            late = slot.plan.rows.late
            if late is not None:
                rows = self._late_filter(late, rows, slot)
                if not len(rows):
                    continue
            pending.setdefault(slot.hook, []).append((rows, slot))
        slots.clear()

    def _late_filter(self, late, rows: np.ndarray, slot: Slot) -> np.ndarray:
        """Drop rows of requests that had already ended (learned only now, see LateEos): they
        move from in flight to filtered, as if filtered before capture."""
        alive = late.alive(slot.plan.step)
        if alive is None:
            return rows
        keep = alive[slot.token_idx // slot.plan.rows.tokens]
        if keep.all():
            return rows
        self.acct.refiltered(self.hook_infos[slot.hook].name, int((~keep).sum()))
        slot.token_idx = slot.token_idx[keep]
        if slot.pattern_batch is not None:
            slot.pattern_batch = slot.pattern_batch[keep]
        return rows[keep]

    def _hand_over(self, pending: dict) -> None:
        for hook, parts in pending.items():
            info = self.hook_infos[hook]
            try:
                block = _merge(info, parts)
            except Exception as e:  # a bug here must not take the engine down; count and go on
                self.acct.error(f"drain: {type(e).__name__}: {e}")
                log.error("dmi drain failed on %s: %s", info.name, traceback.format_exc())
                self.acct.dropped(info.name, sum(len(s.token_idx) for _, s in parts), "drain_error",
                                  in_flight=True)
                continue
            self.host.put(block, block.data.nbytes)
        pending.clear()

    # -- sink thread ------------------------------------------------------------------
    def _sink_loop(self) -> None:
        # An engine that goes idle (a server between requests) must not leave rows written but
        # uncommitted: after this long with nothing new, the sink commits what it has.
        idle_s = max(float(getattr(self.sink, "flush_every_s", 2.0) or 2.0), 0.05)
        dirty = False
        while True:
            item = self.host.get(timeout=idle_s)
            if item is EMPTY:
                if dirty and self.sink_failed is None:
                    self._guard(self.sink.flush)
                dirty = False
                continue
            dirty = not isinstance(item, Marker)
            if isinstance(item, Marker):
                if item.kind in ("flush", "stop") and self.sink_failed is None:
                    self._guard(self.sink.flush)
                if item.done is not None:
                    item.done.set()
                if item.kind == "stop":
                    return
                continue
            if isinstance(item, GapBlock):
                self._guard(self.sink.write_gaps, item)
                continue
            n = len(item.request)
            if self.sink_failed is None and self._guard(self.sink.write, item):
                self.acct.written(item.hook.name, n, item.data.nbytes)
            else:
                self.acct.dropped(item.hook.name, n, "sink_error", in_flight=True)

    def _guard(self, fn, *args) -> bool:
        """Run a sink call; a failing sink is reported once and then bypassed, never raised
        into the engine."""
        if self.sink_failed is not None:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:
            self.sink_failed = f"sink {type(self.sink).__name__} failed: {type(e).__name__}: {e}"
            self.acct.error(self.sink_failed)
            log.error("dmi: %s; capture continues, further rows are counted as dropped", self.sink_failed)
            return False

    def join(self, timeout: float | None = None) -> None:
        self._drain.join(timeout)
        self._sinker.join(timeout)
