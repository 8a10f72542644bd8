"""The drain thread (ring -> host, whole frames) and the sink thread (host -> sink, whole steps).

Neither can wedge the engine: if either thread dies, the engine goes on, its rows are counted as
dropped with a reason, the error is reported once, and closing the session returns.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback

import numpy as np
import torch

from dmi.plan import Frame
from dmi.ring.frames import FrameRing, Marker
from dmi.sinks.base import GapBlock, RowBlock, Sink

from .copy import copier_for
from .hostqueue import EMPTY, ByteBoundedQueue

log = logging.getLogger("dmi")

# The most ring bytes the drain gathers before handing the blocks on (a few steps' worth).
_GATHER_BYTES = 8 << 20


# numpy has no bfloat16: bf16 travels as its uint16 bit patterns (lossless), like every
# other dtype as the same-width numpy type.
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float64: np.float64,
       torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
       torch.uint8: np.uint8, torch.bool: np.bool_}


def numpy_dtype(dtype: torch.dtype):
    return _NP[dtype]


def compact_pattern(rows: np.ndarray, table, src: np.ndarray) -> np.ndarray:
    """[n, heads, keys] over the step's key columns -> [n, heads, max_pos+1] over the request's
    own keys 0..position, in order (padding keys removed; a causal pattern is 0 beyond)."""
    pos = table.position[src]
    width = int(pos.max()) + 1 if pos.size else 1
    out = np.zeros((rows.shape[0], rows.shape[1], width), dtype=rows.dtype)
    mask = table.key_mask
    for i, (b, p) in enumerate(zip(table.batch_of(src), pos)):
        cols = np.flatnonzero(mask[b])[: p + 1] if mask is not None else np.arange(p + 1)
        out[i, :, : len(cols)] = rows[i][:, cols]
    return out


def commit_interval(sink: Sink) -> float:
    """How often the sink thread commits while rows keep coming or the engine idles: the
    sink's own `flush_every_s` (2 s when it has none), at least 0.05 s."""
    return max(float(getattr(sink, "flush_every_s", 2.0) or 2.0), 0.05)


class _Batch(list):
    """Row and gap blocks of whole frames, for the sink; `whole`: its last frame ended a step."""

    def __init__(self, items, whole: bool):
        super().__init__(items)
        self.whole = whole


class Drain:
    """Owns the drain thread (ring -> host) and the sink thread (host -> sink)."""

    def __init__(self, ring, frames: FrameRing, sink: Sink, accounting, hook_infos: dict, names: list[str],
                 host_bytes: int):
        self.ring = ring
        self.frames = frames
        self.sink = sink
        self.acct = accounting
        self.hook_infos = hook_infos      # hook index -> HookInfo, filled by the session
        self.names = names
        self.host = ByteBoundedQueue(host_bytes)
        self.copier = copier_for(ring)
        self.sink_failed: str | None = None
        self.error: str | None = None     # the drain or sink thread died of this
        self.copied_bytes = 0             # host copies the drain made
        self.row_bytes = 0                # bytes of the rows it handed on
        self._uncommitted: dict[str, int] = {}  # per hook: rows written to the sink since its last commit
        self._whole = True                # the last frame handed on ended its step
        self._taken: list = []            # items the drain took and has not handed on yet
        self._warned: set[str] = set()
        self._drain = threading.Thread(target=self._run, args=(self._drain_loop, "drain"), name="dmi-drain",
                                       daemon=True)
        self._sinker = threading.Thread(target=self._run, args=(self._sink_loop, "sink"), name="dmi-sink",
                                        daemon=True)

    def start(self) -> None:
        self._drain.start()
        self._sinker.start()

    def alive(self) -> bool:
        return self.error is None and self._drain.is_alive() and self._sinker.is_alive()

    def answering(self) -> bool:
        """Whether a marker already sent will still be answered: no thread died of an error and
        the sink thread lives (the drain thread itself ends normally once it passed "stop" on)."""
        return self.error is None and self._sinker.is_alive()

    def copies_per_row(self) -> float:
        """Host copies of each captured byte after the ring: the drain's, plus the sink's own."""
        sink_copies = getattr(self.sink, "copied_bytes", 0)
        return round((self.copied_bytes + sink_copies) / self.row_bytes, 3) if self.row_bytes else 0.0

    def _run(self, loop, what: str) -> None:
        try:
            loop()
        except BaseException as e:  # a bug must not wedge the engine: report once, count from now on
            self.error = f"dmi {what} thread died: {type(e).__name__}: {e}"
            self.acct.error(self.error)
            log.error("%s; capture goes on, its rows are counted as dropped\n%s", self.error, traceback.format_exc())
            self._release_waiters()

    def _release_waiters(self) -> None:
        """Whatever waits on a dead thread is let go: frames are counted as dropped; markers go
        on to the sink thread while it lives (it writes what it has, answers them, and ends at
        "stop"), and are answered here when it does not."""
        taken, self._taken = self._taken, []
        markers = []
        for item in taken + self.frames.take_all(0):
            if isinstance(item, Marker):
                markers.append(item)
            else:
                self._discard(item)
        if self._sinker.is_alive() and threading.current_thread() is not self._sinker:
            for m in markers:
                self.host.put(m)
            return
        while True:
            item = self.host.get(timeout=0)
            if item is EMPTY:
                break
            self._discard(item)
        for m in markers:
            self._discard(m)

    def _discard(self, item) -> None:
        if isinstance(item, Marker):
            if item.done is not None:
                item.done.set()
        elif isinstance(item, Frame):
            self.lost(item, "drain_stopped")
        elif isinstance(item, list):
            for block in item:
                if isinstance(block, RowBlock):
                    self.acct.dropped(block.hook.name, len(block.position), "drain_stopped", in_flight=True)

    def lost(self, frame: Frame, reason: str) -> None:
        """A sealed frame that will never be drained: its captured rows are dropped."""
        for h in frame.placed:
            self.acct.dropped(self.names[h.hook], len(h.src), reason, in_flight=True)

    def abandon(self) -> None:
        """Close gave up on a drain that stopped answering: count what it still held, and let
        the sink thread (if it still lives) write what it has and end, so no thread outlives the
        session."""
        self._release_waiters()
        if self._sinker.is_alive():
            self.host.put(Marker("stop"))
        self._sinker.join(5.0)

    # -- drain thread -----------------------------------------------------------------
    def _drain_loop(self) -> None:
        while True:
            items = self._taken = self.frames.take_all(timeout=0.05)
            frames: list[Frame] = []
            batch: list = []
            for k, item in enumerate(items):
                if isinstance(item, Frame):
                    frames.append(item)
                    continue
                self._drain_frames(frames, batch)  # order: everything before a marker or gap goes first
                self._taken = items[k:]
                if isinstance(item, Marker):
                    self._hand_over(batch)
                    self.host.put(item)
                    if item.kind == "stop":
                        return
                else:
                    batch.append(item)
            self._drain_frames(frames, batch)
            self._hand_over(batch)
            self._taken = []

    def _hand_over(self, batch: list) -> None:
        if batch:
            items = _Batch(batch, self._whole)
            batch.clear()
            self.host.put(items, sum(b.data.nbytes for b in items if isinstance(b, RowBlock)))

    def _drain_frames(self, frames: list[Frame], batch: list) -> None:
        """Drain the frames taken, a slice of at most _GATHER_BYTES at a time: each slice's
        blocks go to the sink thread before the next is gathered, so after a pause the sink
        writes while the drain gathers, the ring frees as it goes, and the host buffers stay
        small enough to be reused rather than fresh memory the size of the whole backlog."""
        start, size = 0, 0
        for k, f in enumerate(frames):
            n = sum(b for _, b in f.ranges())
            if k > start and size + n > _GATHER_BYTES:
                self._drain_slice(frames[start:k], batch)
                self._hand_over(batch)
                done = {id(x) for x in frames[start:k]}  # handed on: no longer the drain's to count
                self._taken = [x for x in self._taken if id(x) not in done]
                start, size = k, 0
            size += n
        self._drain_slice(frames[start:], batch)
        frames.clear()

    def _drain_slice(self, frames: list[Frame], batch: list) -> None:
        """Read the frames (coalesced on a GPU), gather each hook's rows of all of them into
        one block (the host copy), then release the ring."""
        if not frames:
            return
        pending: dict[int, list] = {}
        try:
            host, copied = self.copier.copy(frames)
            self.copied_bytes += copied
            self._whole = frames[-1].final
            for f in frames:
                try:
                    self._unpack(f, host, batch, pending)
                except Exception as e:  # a bug here must not take the engine down; count and go on
                    self.acct.error(f"drain: {type(e).__name__}: {e}")
                    log.error("dmi drain failed on step %d: %s", f.step, traceback.format_exc())
                    self.lost(f, "drain_error")
            tables: dict = {}  # the hooks of these frames share their id tables: one list for all
            for hook, parts in pending.items():
                batch.append(self._gather(hook, parts, tables))
        finally:
            for f in frames:
                for off, _ in f.ranges():
                    self.ring.release(off)

    def _unpack(self, f: Frame, host, batch: list, pending: dict) -> None:
        batch.extend(f.gaps)
        if f.offset is None:
            return
        status = host.view(f.offset, f.header).view(np.int64)
        for h in f.placed:
            n = len(h.src)
            name = self.names[h.hook]
            table = f.tables[h.group]
            self.acct.drained(h.nbytes)
            if int(status[h.hook]) != n:
                self._not_captured(f, h, table, name, batch)
                continue
            rows = host.view(h.offset, h.nbytes).view(numpy_dtype(h.dtype)).reshape(n, *h.row_shape)
            src = h.src
            if table.late is not None:
                rows, src = self._late_filter(table, f.step, name, rows, src)
                if not len(src):
                    continue
            if self.hook_infos[h.hook].ragged:
                rows = compact_pattern(rows, table, src)
                self.copied_bytes += rows.nbytes
            pending.setdefault(h.hook, []).append((rows, table, src, f.step))

    def _gather(self, hook: int, parts: list, tables: dict) -> RowBlock:
        """One block of a hook's rows from several frames: the one host copy of each row (out of
        the ring, or the pinned mirror on a GPU), after which the ring space can be reused."""
        info = self.hook_infos[hook]
        datas = [p[0] for p in parts]
        if info.ragged:
            width = max(d.shape[-1] for d in datas)
            datas = [d if d.shape[-1] == width else np.pad(d, [(0, 0)] * (d.ndim - 1) + [(0, width - d.shape[-1])])
                     for d in datas]
        n = sum(len(d) for d in datas)
        stage = getattr(self.sink, "staging", None)
        data = (stage(info, n, datas[0].shape[1:], datas[0].dtype) if stage is not None
                else np.empty((n, *datas[0].shape[1:]), datas[0].dtype))
        if len(datas) > 1:
            np.concatenate(datas, out=data)
        else:
            np.copyto(data, datas[0])
        self.copied_bytes += data.nbytes
        self.row_bytes += data.nbytes
        # One id table for the block: the frames' tables one after another. Blocks of other hooks
        # from the same frames get the same list object, so a sink maps its ids once.
        key = tuple(id(p[1]) for p in parts)
        ids, starts = tables.get(key) or tables.setdefault(key, self._id_table(parts))
        index = [table.request[src].astype(np.int32) + at for (_, table, src, _), at in zip(parts, starts)]
        return RowBlock(hook=info, data=data, request_index=np.concatenate(index), request_ids=ids,
                        position=np.concatenate([t.position[s] for _, t, s, _ in parts]),
                        step=np.concatenate([np.full(len(s), st, dtype=np.int64) for _, _, s, st in parts]))

    @staticmethod
    def _id_table(parts: list) -> tuple[list[str], list[int]]:
        ids: list[str] = []
        starts = []
        for _, table, _, _ in parts:
            starts.append(len(ids))
            ids.extend(table.request_ids)
        return ids, starts

    def _not_captured(self, f: Frame, h, table, name: str, batch: list) -> None:
        """Planned rows the capture point did not write: its module never ran this step, or ran
        inside a graph compiled before attach, or saw a tensor the plan was not made for."""
        n = len(h.src)
        requests = [table.request_ids[r] for r in table.request[h.src]]
        self.acct.dropped(name, n, "not_captured", in_flight=True, requests=requests)
        batch.append(GapBlock(name, requests, table.position[h.src].astype(np.int64),
                              np.full(n, f.step, np.int64), "not_captured"))
        if name not in self._warned:
            self._warned.add(name)
            msg = (f"dmi: {name}: its capture point did not write step {f.step}'s planned rows; they are recorded as "
                   f"gaps (reason 'not_captured'). Its module did not run, saw a tensor of another shape than "
                   f"planned, or runs inside a graph compiled before dmi.attach without dmi's capture points "
                   f"(call torch._dynamo.reset() or compile after attaching)")
            self.acct.error(msg)
            log.warning(msg)

    def _late_filter(self, table, step: int, name: str, rows: np.ndarray, src: np.ndarray):
        """Drop rows of requests that had already ended (learned only now, see LateEos): they
        move from in flight to filtered, as if filtered before capture."""
        alive = table.late.alive(step)
        if alive is None:
            return rows, src
        keep = alive[table.batch_of(src)]
        if keep.all():
            return rows, src
        self.acct.refiltered(name, int((~keep).sum()))
        return rows[keep], src[keep]

    # -- sink thread ------------------------------------------------------------------
    def _sink_loop(self) -> None:
        # An engine that goes idle (a server between requests) must not leave rows written but
        # uncommitted: after this long with nothing new, the sink commits what it has.
        every = commit_interval(self.sink)
        last = time.monotonic()
        dirty = False
        while True:
            item = self.host.get(timeout=every)
            if isinstance(item, Marker):
                if item.kind in ("flush", "stop") and self.sink_failed is None:
                    self._commit()
                dirty, last = False, time.monotonic()
                if item.done is not None:
                    item.done.set()
                if item.kind == "stop":
                    return
                continue
            whole = True
            if item is not EMPTY:
                for block in item:
                    self._write(block)
                dirty, whole = True, item.whole
            # Commits fall between whole steps only: a reader never sees a step torn across hooks.
            if dirty and whole and time.monotonic() - last >= every:
                if self.sink_failed is None:
                    self._commit()
                dirty, last = False, time.monotonic()

    def _commit(self) -> None:
        """Flush the sink; once it returns, the rows written since its last commit are committed."""
        if self._guard(self.sink.flush) and self._uncommitted:
            self.acct.committed(self._uncommitted)
            self._uncommitted = {}

    def _write(self, block) -> None:
        if isinstance(block, GapBlock):
            self._guard(self.sink.write_gaps, block)
            return
        n = len(block.position)
        if self.sink_failed is None and self._guard(self.sink.write, block):
            self.acct.written(block.hook.name, n, block.data.nbytes)
            if getattr(self.sink, "commits_on_write", False):
                self.acct.committed({block.hook.name: n})
            else:
                self._uncommitted[block.hook.name] = self._uncommitted.get(block.hook.name, 0) + n
        else:
            self.acct.dropped(block.hook.name, n, "sink_error", in_flight=True, requests=block.request)

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
