"""One plan per step: everything the capture points of a step need, decided before the forward.

From the adapter's row tables the planner decides, vectorised over hooks and once per step:
which rows each hook keeps (filters, degrade), one ring reservation for the step's frame
(overload policy), and the control table the capture op reads (kernels/capture_op.py). Inside
the forward a capture point only launches `dmi::capture`; after it the frame is sealed and the
drain copies it whole.

A frame in the ring: a header of one int64 status word per hook (the op writes how many rows it
wrote), then each planned hook's rows back to back, 64-byte aligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmi.ring.payload import PayloadRing

from .control import ControlTable
from .rows import TOKENS, RowTable


@dataclass
class HookRows:
    """One hook's rows in one frame."""

    hook: int
    group: str
    src: np.ndarray              # int64 [n]: kept rows of the group's table (= rows of the hook's tensor)
    produced: int                # real rows the engine computed for this hook
    filtered: int                # real rows the filters left out
    lost: np.ndarray             # group rows the filters keep but `degrade` gave up
    nbytes: int = 0
    offset: int | None = None    # ring offset of its first row; None: not written this step
    reason: str | None = None    # why not written (oversize, ring_full, plan_overflow, ...)
    row_shape: tuple[int, ...] = ()
    dtype: Any = None
    dynamic: bool = False        # placed by an eager-only capture during the step, outside the frame
    fired: bool = False          # eager: its capture point ran this step (frames split only between hooks)
    slot: int | None = None      # its own source-row list in the control table (per-request masks)


@dataclass
class Frame:
    step: int
    tables: dict[str, RowTable]
    offset: int | None = None    # ring range of the header and the planned rows
    nbytes: int = 0
    header: int = 0              # bytes of the status header at `offset`
    hooks: list[HookRows] = field(default_factory=list)
    extra: list[tuple[int, int]] = field(default_factory=list)  # (offset, bytes) of eager-only slots, in order
    gaps: list = field(default_factory=list)  # GapBlocks recorded while planning and capturing this step
    placed: list[HookRows] = field(default_factory=list)  # hooks whose rows this part of the frame holds
    final: bool = True           # False: more parts of this step follow (a step larger than the ring)
    # A plan reused from the last step's layout (Planner._reuse) whose hooks are all placed or
    # empty: nothing deferred or dynamic to settle at seal, and these books to record
    books: list | None = None
    stream: Any = None           # GPU: the stream the step's captures were enqueued on
    done_event: Any = None       # GPU: recorded on `stream` when the step ended (the frame sealed)

    @property
    def rows(self) -> RowTable:
        return self.tables[TOKENS]

    def ranges(self) -> list[tuple[int, int]]:
        """The ring byte ranges this frame holds, in allocation order."""
        out = [(self.offset, self.nbytes)] if self.offset is not None else []
        return out + self.extra


class Planner:
    """Made once at attach from the bindings; plans every step."""

    def __init__(self, bindings, row_filter, overload, device, fallback: set[int]):
        self.bindings = bindings
        self.filter = row_filter
        self.overload = overload
        self.fallback = fallback
        self.groups = sorted({b.group for b in bindings} | {TOKENS})
        self.group_index = {g: i for i, g in enumerate(self.groups)}
        self.control = ControlTable(len(bindings), len(self.groups), device)
        self.header = PayloadRing.aligned(8 * len(bindings))
        self.fixed = [b.row_shape is not None and b.dtype is not None for b in bindings]
        self.row_shapes = [tuple(b.row_shape) if b.row_shape is not None else None for b in bindings]
        # Served engines: each request may select its own hooks and tokens (dmi/serve). A
        # callable (group, table) -> bool [hooks, rows] or None (every request takes the spec).
        self.request_masks = None
        self._layout: _Layout | None = None  # the last plan's, while a step like it may reuse it

    def enable_request_masks(self, masks) -> None:
        """Let `masks(group, table)` narrow each hook's rows per request. A hook's rows may then
        differ from its group's, so every hook gets a source-row list of its own in the control
        table (made before any graph captures its tensors)."""
        self._layout = None
        if self.request_masks is None:
            # The same table, grown: whoever holds it (the eager kernel, an adapter) sees the rows.
            self.control.add_groups(len(self.bindings))
        self.request_masks = masks

    def plan(self, step: int, tables: dict[str, RowTable], alive) -> Frame:
        tables = {g: tables.get(g, tables[TOKENS]) for g in self.groups}
        degraded = self.overload.update(step)
        # Served engines: only a step with a request that chose its own hooks or tokens plans
        # hook by hook; every other step may reuse the last plan as an unserved one does.
        masks = ({g: self.request_masks(g, t) for g, t in tables.items()} if self.request_masks is not None
                 else dict.fromkeys(tables))
        masked = any(m is not None for m in masks.values())
        layout = None if masked else self._layout
        if layout is not None and self.filter.by_request_only \
                and layout.same_requests(tables, degraded, self.filter.step_selected(step)):
            # the same request rows as the step before, and filters that read nothing else of
            # them: the same rows kept (a steady decode), without running the filters
            return self._reuse(layout, step, tables, alive, layout.kept_now, degraded)
        kept: dict[str, tuple] = {}
        for g, table in tables.items():
            if g != TOKENS and table is tables[TOKENS]:
                continue  # a group whose rows are the token rows this step (decode logits): below
            keep, fb = self.filter.keep(step, table)
            produced = int((table.request >= 0).sum())
            kept[g] = (keep, fb, produced, produced - int(keep.sum()))
        kept = {g: kept.get(g) or kept[TOKENS] for g in tables}
        if layout is not None and layout.matches(kept, degraded):
            return self._reuse(layout, step, tables, alive, kept, degraded)
        self._layout = None
        # Hooks of one group share their row arrays (read-only): per step the work is per group,
        # and per hook only a record (a decode step plans every hook; this is its whole cost).
        shared: dict[tuple[str, bool] | None, tuple[np.ndarray, np.ndarray]] = {}
        frame = Frame(step, tables, header=self.header)
        sizes = []
        for i, b in enumerate(self.bindings):
            keep, fb, produced, filtered = kept[b.group]
            fallback = degraded and i in self.fallback
            mask = masks[b.group]
            key = (b.group, fallback) if mask is None else None  # per-request masks: a hook's own rows
            rows = shared.get(key)
            if rows is None:
                if mask is not None:  # rows no request asked this hook for are filtered, not lost
                    filtered += int((keep & ~mask[i]).sum())
                    keep = keep & mask[i]
                    fb = fb & mask[i] if fb is not None else None
                chosen = (fb if fallback else np.zeros_like(keep)) if degraded else keep
                rows = (np.flatnonzero(chosen), np.flatnonzero(keep & ~chosen))
                if key is not None:
                    shared[key] = rows
            src, lost = rows
            h = HookRows(i, b.group, src, produced, filtered, lost)
            if mask is not None:
                h.slot = len(self.groups) + i
            if self.fixed[i]:
                h.row_shape, h.dtype = self.row_shapes[i], b.dtype
                h.nbytes = len(src) * b.row_bytes
            else:
                h.dynamic = True
            frame.hooks.append(h)
            sizes.append(h.nbytes)
        ctrl = self.control
        for g, (keep, fb, _, _) in kept.items():
            n = int((fb if degraded else keep).sum())
            if not ctrl.fits(n):
                for h in frame.hooks:
                    if h.group == g and len(h.src):
                        h.reason, sizes[h.hook] = "plan_overflow", 0
        dynamic = any(h.dynamic and len(h.src) for h in frame.hooks)
        if any(sizes) or dynamic:
            off, reasons = self.overload.reserve(self.header, sizes, alive, header_only=dynamic)
        else:
            off, reasons = None, [None] * len(sizes)
        frame.offset = off
        self._fill(frame, off, reasons, degraded, kept)
        if not masked and not dynamic and all(h.reason is None for h in frame.hooks):
            self._layout = _Layout(frame, kept, degraded, sizes, self.control.ctrl_np, self.filter.step_selected(step))
        return frame

    def _reuse(self, layout: "_Layout", step: int, tables: dict[str, RowTable], alive, kept: dict,
               degraded: bool) -> Frame:
        """A step whose filters keep exactly the rows of the last plan's (a steady decode: the
        same requests, one token each) gets that plan's layout at a new ring offset: the same
        hook records and source rows (the rows table is left as the last plan wrote it), the
        control rows shifted by the new offset. The cost of a plan is then one reservation
        and a few array copies, not a pass over the hooks (it runs between every two forwards,
        with the engine's caches cold). A reservation that fails (drop, a dead drain) is
        recorded as the full plan records it."""
        frame = Frame(step, tables, header=self.header)
        frame.hooks = [HookRows(*t) for t in layout.hooks]
        if layout.nbytes:
            off, why = self.overload.reserve_bytes(layout.nbytes, alive)
            if off is None:
                self._fill(frame, None, [why if n else None for n in layout.sizes], degraded, kept)
                return frame
            c = self.control.ctrl_np
            np.copyto(c, layout.ctrl)
            c[layout.placed, 1] += off
            c[layout.placed, 6] += off
            self.overload.ring.zero(off, self.header)
            frame.offset, frame.nbytes = off, layout.nbytes
            for h, rel in zip(frame.hooks, layout.offsets):
                if rel is not None:
                    h.offset = off + rel
                    frame.placed.append(h)
        else:
            frame.header = 0
            self.control.ctrl_np[:] = 0
        self.control.send()
        frame.books = layout.books
        return frame

    def _fill(self, frame: Frame, off: int | None, reasons, degraded: bool, kept) -> None:
        ctrl = self.control
        c = ctrl.ctrl_np
        c[:] = 0
        cursor = self.header
        for h, why in zip(frame.hooks, reasons):
            if h.reason is None and why is not None:
                h.reason = why
            if off is None or h.dynamic or not len(h.src) or h.reason is not None:
                continue
            self._point(frame, h, off + cursor, off)
            cursor += PayloadRing.aligned(h.nbytes)
        frame.nbytes = cursor if off is not None else 0
        if off is None:
            frame.header = 0
        else:  # status words start at 0: a hook whose capture point never runs reads as not captured
            self.overload.ring.zero(off, self.header)
        for g, (keep, fb, _, _) in kept.items():
            src = np.flatnonzero(fb if degraded else keep)
            if len(src) <= ctrl.capacity:
                ctrl.rows_np[self.group_index[g], : len(src)] = src
        for h in frame.hooks:
            if h.slot is not None and len(h.src) <= ctrl.capacity:
                ctrl.rows_np[h.slot, : len(h.src)] = h.src
        ctrl.send()

    def _point(self, frame: Frame, h: HookRows, offset: int, header: int, row_bytes: int | None = None) -> None:
        """Hook h's rows go to `offset`, its status word into the header at `header`; the op
        writes only a tensor of the group's row count and `row_bytes` (default: the binding's)."""
        h.offset = offset
        rb = self.bindings[h.hook].row_bytes if row_bytes is None else row_bytes
        slot = self.group_index[h.group] if h.slot is None else h.slot
        self.control.ctrl_np[h.hook] = (1, offset, len(h.src), slot,
                                        frame.tables[h.group].n_rows, rb, header + 8 * h.hook)
        frame.placed.append(h)

    def next_part(self, frame: Frame, first: int, alive) -> tuple[Frame, list[HookRows]]:
        """The step outgrew the ring: a new part of its frame for the deferred hooks from
        `first` on, in order, as many as fit (the caller sealed the earlier part)."""
        part = Frame(frame.step, frame.tables, header=self.header, hooks=frame.hooks, stream=frame.stream)
        todo = sorted((h for h in frame.hooks if h.reason == "deferred"), key=lambda h: (h.hook != first, h.hook))
        sizes = [0] * len(frame.hooks)
        for h in todo:
            sizes[h.hook] = h.nbytes
        off, reasons = self.overload.reserve(self.header, sizes, alive)
        if off is None:
            for h in todo:
                h.reason = reasons[h.hook] or "ring_full"
            part.header = 0
            return part, todo
        self.overload.ring.zero(off, self.header)
        cursor = self.header
        for h in todo:
            if reasons[h.hook] is None:
                h.reason = None
                self._point(part, h, off + cursor, off)
                self.control.send_row(h.hook)
                cursor += PayloadRing.aligned(h.nbytes)
        part.offset, part.nbytes = off, cursor
        return part, [h for h in todo if h.reason not in (None, "deferred")]

    def split(self, frame: Frame) -> None:
        """Before sealing a part of a step: hooks placed in it whose capture point has not run
        yet move to the next part (their rows are not in this one)."""
        for h in [h for h in frame.placed if not h.fired and not h.dynamic]:
            frame.placed.remove(h)
            h.offset, h.reason = None, "deferred"
            self.control.ctrl_np[h.hook] = 0
            self.control.send_row(h.hook)

    def forget_layout(self) -> None:
        """The next plan is made in full (the control table was changed outside a plan)."""
        self._layout = None

    def disable(self) -> None:
        """Between steps nothing is planned: a stray forward writes nothing."""
        self.control.ctrl_np[:] = 0
        self.control.send()

    def place_dynamic(self, frame: Frame, h: HookRows, offset: int, nbytes: int, row_bytes: int,
                      row_shape, dtype) -> None:
        """An eager-only hook's rows were given ring space during the step (its tensor has the
        group's row count, checked by the caller): point its ctrl row there."""
        h.nbytes, h.row_shape, h.dtype = nbytes, tuple(row_shape), dtype
        frame.extra.append((offset, nbytes))
        self._point(frame, h, offset, frame.offset, row_bytes)
        self.control.send_row(h.hook)



class _Layout:
    """What a plan decided, relative to its frame's ring offset, and the filter results it was
    decided from (a later step with equal results may reuse it: Planner._reuse)."""

    _FIELDS = ("hook", "group", "src", "produced", "filtered", "lost", "nbytes", "offset", "reason", "row_shape",
               "dtype", "dynamic")

    def __init__(self, frame: Frame, kept: dict, degraded: bool, sizes: list[int], ctrl: np.ndarray,
                 selected: bool):
        self.kept = {g: (keep.copy(), None if fb is None else fb.copy(), produced)
                     for g, (keep, fb, produced, _) in kept.items()}
        self.kept_now = kept
        # the row tables' request columns it was planned from (an adapter that keeps a steady
        # decode's columns hands the same arrays again) and whether the step filter chose its step
        self.requests = {g: (t.request, t.request_ids) for g, t in frame.tables.items()}
        self.selected = selected
        self.degraded = degraded
        self.sizes = list(sizes)
        base = frame.offset or 0
        self.offsets = [None if h.offset is None else h.offset - base for h in frame.hooks]
        self.hooks = [tuple(None if f == "offset" else getattr(h, f) for f in self._FIELDS) for h in frame.hooks]
        self.nbytes = frame.nbytes
        self.placed = np.array([h.hook for h in frame.placed], dtype=np.int64)
        # each hook's (produced, filtered, kept, bytes) for the books (Accounting.captured_many)
        self.books = None if any(len(h.lost) for h in frame.hooks) else [
            (h.hook, h.produced, h.filtered, len(h.src) if h.offset is not None else 0,
             h.nbytes if h.offset is not None else 0) for h in frame.hooks]
        self.ctrl = ctrl.copy()
        if len(self.placed):
            self.ctrl[self.placed, 1] -= base
            self.ctrl[self.placed, 6] -= base

    def same_requests(self, tables: dict[str, RowTable], degraded: bool, selected: bool) -> bool:
        if degraded != self.degraded or selected != self.selected or tables.keys() != self.requests.keys():
            return False
        for g, t in tables.items():
            request, ids = self.requests[g]
            if t.request is not request or t.request_ids is not ids:
                return False
        return True

    def matches(self, kept: dict, degraded: bool) -> bool:
        if degraded != self.degraded or kept.keys() != self.kept.keys():
            return False
        for g, (keep, fb, produced, _) in kept.items():
            k, f, p = self.kept[g]
            if produced != p or keep.shape != k.shape or not np.array_equal(keep, k):
                return False
            if (fb is None) != (f is None) or (fb is not None and not np.array_equal(fb, f)):
                return False
        return True
