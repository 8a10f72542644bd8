"""A capture session: owns the plan, the ring, the drain and the sink for one attached engine.

The adapter drives it once per engine step, outside any compiled region:
begin_step(rows) plans the whole step before the forward; inside it each capture point only
launches `dmi::capture` with the plan's tensors; end_step() seals the step's frame for the drain.
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import threading
import weakref

import numpy as np
import torch

from dmi import __version__
from dmi.drain import Drain, commit_interval
from dmi.errors import RingTooSmallError, SessionStateError, SpecError
from dmi.kernels.capture_op import CTRL_WIDTH, eager as eager_kernel
from dmi.plan import TOKENS, Frame, Planner, RowTable
from dmi.policies import BLOCK_TIMEOUT_S, Accounting, Overload, RowFilter
from dmi.ring import FrameRing, Marker, PayloadRing
from dmi.sinks.base import GapBlock, HookInfo, RunMeta

log = logging.getLogger("dmi")

# One session per engine: a second would interleave two books on one set of hooks.
_ARMED: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()

CLOSE_TIMEOUT_S = 120.0  # a drain that stops answering is given up on after this long at close


class ConcurrentStepError(SessionStateError):
    """A second thread started a step while another thread's step was in flight."""


class Session:
    def __init__(self, engine, adapter, spec, sink, progress: bool = False):
        self.engine = engine
        self.adapter = adapter
        self.spec = spec
        self.closed = False
        self.engine_error: str | None = None  # the engine failed (engine_failed): the run is incomplete
        self._lock = threading.Lock()
        if id(engine) in _ARMED:
            raise SessionStateError("this engine already has an open dmi session; leave it (session.close()) first")

        # Validate everything before touching the engine, so bad input leaves it as it was.
        self.bindings = adapter.bind(spec.hooks)
        header = PayloadRing.aligned(8 * len(self.bindings))
        need = header + sum(PayloadRing.aligned(b.row_bytes) for b in self.bindings)
        if need > spec.ring.bytes:
            raise RingTooSmallError(
                "ring.bytes", f"{spec.ring.bytes} bytes cannot hold one token row of the selected hooks "
                f"({need} bytes for {len(self.bindings)} hooks); raise ring.bytes to at least {need}, "
                f"or select fewer hooks")
        self.names = [b.name for b in self.bindings]
        self.fallback_hooks = self._check_fallback(spec)
        self.edits = None  # interventions (dmi.interventions): planned with each step, booked after it
        # A served engine whose operator lets clients steer arms a value bank per steerable hook.
        policy = getattr(adapter, "serve_policy", None)
        banks = (policy.bank_hooks(self.names), policy.intervention_slots) \
            if policy is not None and policy.allow_interventions else None
        if spec.interventions or banks:
            from dmi.interventions.edits import Edits

            self.edits = Edits(spec, adapter, self.names, _predicate, lambda k, m: self._warn_once(k, m),
                               banks=banks)
        self.acct = Accounting()
        self.sink = sink
        name, config = adapter.describe()
        self.ring = PayloadRing(spec.ring.bytes, device=adapter.device)
        self._on_gpu = self.ring.buffer.device.type == "cuda"
        # rows never wait in the ring for a batch longer than the sink's own commit interval
        self.frames = FrameRing(pause=spec.drain.schedule == "pause", max_delay=spec.drain.max_delay_s,
                                max_period=min(1.0, commit_interval(sink)))
        self.overload = Overload(spec, self.ring, self.acct, wake=self.frames.wake)
        self.planner = Planner(self.bindings, RowFilter(spec, predicate=_predicate(spec.requests.predicate)),
                               self.overload, self.ring.buffer.device, self.fallback_hooks)
        self._kernel = eager_kernel(self.ring.buffer, self.planner.control)
        self.hook_infos: dict[int, HookInfo] = {}
        for i, b in enumerate(self.bindings):
            if b.row_shape is not None and b.dtype is not None:
                self._info_from(i, b.dtype, tuple(b.row_shape))
        sink.open(RunMeta(dmi_version=__version__, engine=adapter.engine_name, model=name, model_config=config,
                          spec_json=spec.to_json(),
                          extra={"hooks": self.names, "sources": [b.source for b in self.bindings],
                                 **adapter.run_attrs()}))
        self.drain = Drain(self.ring, self.frames, sink, self.acct, self.hook_infos, self.names,
                           host_bytes=spec.ring.bytes)
        self.frames.alive = self.drain.alive
        # The books go into every commit, so a killed run keeps them; the interventions'
        # per-request ranges only as they change (they grow with every request steered).
        sink.stats_provider = functools.partial(self.stats, per_request=False)
        sink.books_provider = self.edits.books.take_changes if self.edits is not None else None
        self.drain.start()
        self.step = 0
        self.frame: Frame | None = None
        self._owner: int | None = None   # the thread whose step is in flight
        self._step_lock = threading.Lock()
        self._warned: set[str] = set()
        self.progress = None
        if progress:
            from dmi.progress import Progress

            self.progress = Progress(self)
        try:
            adapter.arm(self, self.bindings)
        except BaseException:
            self._shutdown(complete=False)
            raise
        _ARMED[id(engine)] = self
        self.strict = None
        from dmi import strict

        # Tests: record any dmi Python in the hot path (dmi/strict.py), from the first step on
        # (an engine compiled at construction traces its graph before that).
        self._strict_pending = strict.enabled()
        atexit.unregister(_close_open_sessions)
        atexit.register(_close_open_sessions)
        _close_at_child_exit()

    def _check_fallback(self, spec) -> set[int]:
        """Indices of the hooks the degrade fallback keeps; it must be a subset of the spec."""
        if spec.degrade is None:
            return set(range(len(self.names)))
        fb = spec.degrade.fallback
        names = self.adapter.resolve(fb.hooks)
        extra = [n for n in names if n not in self.names]
        if extra:
            raise SpecError("degrade.fallback.hooks", f"the fallback must be a subset of the spec's hooks; "
                                                       f"not in the spec: {', '.join(extra[:5])}")
        if not fb.tokens.is_subset_of(spec.tokens):
            raise SpecError("degrade.fallback.tokens", f"the fallback must keep a subset of the spec's rows: "
                                                        f"{fb.tokens!r} is not within {spec.tokens!r}")
        return {self.names.index(n) for n in names}

    # -- the plan's tensors, for capture points --------------------------------------------
    def capture_args(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """What binding i's capture point passes to dmi::capture besides its tensor:
        (ring, rows, ctrl, slot). Fixed while the session lives: a compiled graph takes them
        as inputs, and the plan rewrites their contents each step."""
        c = self.planner.control
        return self.ring.buffer, c.rows, c.ctrl, i

    # -- driven by the adapter, on the engine's thread, outside compiled code ----------------
    def begin_step(self, rows: RowTable, groups: dict[str, RowTable] | None = None) -> None:
        """Plan the whole step: `rows` are its token rows; `groups` the tables of other row
        groups the bindings use (e.g. {"logits": one row per request})."""
        if self.closed:
            return
        if self._strict_pending:
            from dmi import strict

            self._strict_pending = False
            self.strict = strict.Probe(self).install()
        self.acquire_step()
        tables = {TOKENS: rows, **(groups or {})}
        if self.edits is not None:  # first: a step whose edits cannot apply is refused before any plan
            self.edits.begin(self.step, rows)
        # Once the sink has failed nothing can be written: plan no ring space, count the rows.
        alive = self.drain.alive if self.drain.sink_failed is None else (lambda: False)
        frame = self.planner.plan(self.step, tables, alive)
        if self._on_gpu:
            frame.stream = torch.cuda.current_stream(self.ring.buffer.device)
        self._account_plan(frame)
        self.frame = frame

    def _account_plan(self, frame: Frame) -> None:
        if frame.books is not None:  # a reused layout: every hook placed or empty
            self.acct.captured_many(self.names, frame.books)
            return
        acct, sink_failed = self.acct, self.drain.sink_failed is not None
        for h in frame.hooks:
            name = self.names[h.hook]
            table = frame.tables[h.group]
            if len(h.lost):
                self._gap(frame, name, table, h.lost, "degraded")
            n = len(h.src)
            if h.dynamic or not n:
                acct.captured(name, h.produced, h.filtered, 0, 0)
            elif h.offset is not None or h.reason == "deferred":
                acct.captured(name, h.produced, h.filtered, n, h.nbytes)
            else:
                reason = "sink_error" if sink_failed else (h.reason or "ring_full")
                if reason == "oversize":
                    self._warn_once("oversize:" + name, f"dmi: {name}: one step's rows need {h.nbytes} bytes, more "
                                                        f"than ring.bytes={self.ring.capacity} holds with the other "
                                                        f"hooks; those rows are dropped and recorded as gaps. Raise "
                                                        f"ring.bytes.")
                self._gap(frame, name, table, h.src, reason, produced=h.produced, filtered=h.filtered)

    def wants(self, i: int) -> bool:
        """Whether binding i's capture point has anything to do in this step: rows planned for
        it, a later part of a split frame, or an eager-only layout placed when it fires. An
        eager point that has nothing to do returns before reading or deriving its tensor. Code
        being traced or recorded into a CUDA graph always captures: it replays with the plans of
        later steps."""
        if torch.compiler.is_compiling() or (self._on_gpu and torch.cuda.is_current_stream_capturing()):
            return True
        frame = self.frame
        if frame is None:
            return False
        h = frame.hooks[i]
        return h.offset is not None or h.dynamic or h.reason == "deferred"

    def capture(self, i: int, x: torch.Tensor, flat: bool = False) -> None:
        """Capture binding i's tensor: [batch, t, ...] (or [rows, ...] when flat) whose rows are
        its row group's rows. For fixed-layout hooks this is exactly one dmi::capture launch."""
        frame = self.frame
        if frame is None:
            return
        lead = 1 if flat or x.dim() < 2 else 2
        h = frame.hooks[i]
        if h.dynamic:
            return self._capture_dynamic(frame, i, x.flatten(0, 1) if lead == 2 else x)
        if h.reason == "deferred":
            self._next_part(frame, i)
        self._kernel(x, i, lead)  # the kernel merges [batch, tokens] itself: no torch op here
        h.fired = True

    def _next_part(self, frame: Frame, i: int) -> None:
        """The step is larger than the ring: hand the part written so far to the drain, then
        wait for room for the next hooks (eager forwards only; see policies/overload.py)."""
        frame.final = False
        self.planner.split(frame)
        self._push(frame)
        part, failed = self.planner.next_part(frame, i, self.drain.alive)
        for h in failed:
            self.acct.dropped(self.names[h.hook], len(h.src), h.reason, in_flight=True)
            self._gap_rows(part, self.names[h.hook], frame.tables[h.group], h.src, h.reason)
        self.frame = part

    def _capture_dynamic(self, frame: Frame, i: int, rows_x: torch.Tensor) -> None:
        """Eager-only path for hooks whose row layout is known only now (module:, HookPoint,
        attention patterns): ring space is placed when the hook fires."""
        h = frame.hooks[i]
        name = self.names[i]
        n = len(h.src)
        if h.offset is not None or h.reason is not None or not n:
            return  # fired twice in one step, or nothing to keep
        if frame.offset is None:
            h.reason = "ring_full"
            self._gap(frame, name, frame.tables[h.group], h.src, h.reason)
            return
        table = frame.tables[h.group]
        if rows_x.shape[0] != table.n_rows:
            self._warn_once("shape:" + name, f"dmi: {name}: a tensor of {rows_x.shape[0]} rows does not map onto "
                                             f"the step's {table.n_rows} rows; its rows are dropped and recorded "
                                             f"(reason 'shape')")
            h.reason = "shape"
            self._gap(frame, name, table, h.src, "shape")
            return
        row_bytes = math.prod(rows_x.shape[1:]) * rows_x.element_size()
        nbytes = n * row_bytes
        if not self.ring.could_fit(nbytes, frame.ranges()):
            off = None  # can never fit while this step holds its own space: drop now, never wait
            reason = "oversize"
        else:
            off = self.ring.alloc(nbytes, wait=self.spec.overload != "drop", timeout=BLOCK_TIMEOUT_S,
                                  alive=self.drain.alive, before_wait=self.frames.wake)
            reason = "ring_full"
        if off is None:
            h.reason = reason
            self._gap(frame, name, table, h.src, h.reason)
            return
        self._info_from(i, rows_x.dtype, tuple(rows_x.shape[1:]))
        self.planner.place_dynamic(frame, h, off, nbytes, row_bytes, rows_x.shape[1:], rows_x.dtype)
        self.acct.captured(name, 0, 0, n, nbytes)
        self._kernel(rows_x, i)

    def acquire_step(self) -> None:
        """Steps of one session never overlap: a second thread's forward waits here until the
        first thread's step has ended (each thread keeps its own row state in the adapter), so
        concurrent callers are served one step at a time and each row keeps its request. An
        adapter that builds its row table from shared state calls this before building it."""
        me = threading.get_ident()
        if self._owner == me:
            if self.frame is not None:  # the previous step never ended (its forward raised early)
                self._seal(self.frame)
            return
        if not self._step_lock.acquire(timeout=BLOCK_TIMEOUT_S):
            raise ConcurrentStepError(
                f"dmi: another thread's forward on this attached engine has held its step for {BLOCK_TIMEOUT_S:.0f} s; "
                f"concurrent callers are served one step at a time, and that step never ended")
        self._owner = me

    def end_step(self) -> None:
        if self._owner != threading.get_ident():
            return  # not this thread's step (its begin was refused)
        frame = self.frame
        self._owner = None
        try:
            if frame is not None:
                self._seal(frame)
        finally:
            self._step_lock.release()

    def _seal(self, frame: Frame) -> None:
        self.frame = None
        for h in (frame.hooks if frame.books is None else ()):
            if h.dynamic and h.offset is None and h.reason is None and len(h.src):
                # an eager-only hook with rows whose capture point never ran
                h.reason = "not_captured"
                self._gap(frame, self.names[h.hook], frame.tables[h.group], h.src, "not_captured")
            elif h.reason == "deferred":
                # never placed: a compiled forward cannot split a step larger than the ring
                h.reason = "oversize"
                self._warn_once("deferred:" + self.names[h.hook],
                                f"dmi: {self.names[h.hook]}: a compiled step's rows need more than ring.bytes="
                                f"{self.ring.capacity} with the other hooks; those rows are dropped and recorded "
                                f"as gaps (an eager forward would wait for the drain). Raise ring.bytes.")
                self.acct.dropped(self.names[h.hook], len(h.src), "oversize", in_flight=True)
                self._gap_rows(frame, self.names[h.hook], frame.tables[h.group], h.src, "oversize")
        self.planner.disable()
        if self.edits is not None:
            self.edits.end()
        self._push(frame)
        self.step += 1
        self.acct.steps = self.step

    def _push(self, frame: Frame) -> None:
        if frame.offset is None and not frame.extra and not frame.gaps:
            return  # nothing planned, nothing missing: nothing for the drain (dmi-null costs no wake-up)
        if self._on_gpu and frame.stream is not None:
            ev = torch.cuda.Event()
            ev.record(frame.stream)  # the drain waits on this, never on the stream
            frame.done_event = ev
        if not self.frames.put(frame):
            self.drain.lost(frame, "drain_stopped")

    def not_computed(self, request_id: str, positions, reason: str = "prefix_cache", hooks=None,
                     edits: bool | None = None) -> None:
        """Record that the engine did not compute these positions of a request (served from a
        prefix cache), for every hook (or `hooks`, indices): a reader sees them as gaps with
        `reason`, never as silently missing. They were never produced, so produced = filtered +
        written + dropped is unchanged; stats()["not_computed"] counts them per reason.
        Token rows (default: when `hooks` is None; `edits` says so explicitly) that interventions
        select are booked as not edited, under `reason`."""
        pos = np.asarray(positions, dtype=np.int64)
        if self.closed or not len(pos):
            return
        if self.edits is not None and (edits if edits is not None else hooks is None):  # edits there never ran
            self.edits.skipped(self.step, request_id, pos, reason)
        names = self.names if hooks is None else [self.names[i] for i in hooks]
        self.acct.skipped(len(pos) * len(names), reason)
        for name in names:
            self.frames.put(GapBlock(name, [request_id] * len(pos), pos, np.full(len(pos), self.step, np.int64),
                                     reason))

    def _info_from(self, i: int, dtype: torch.dtype, row_shape: tuple[int, ...]) -> HookInfo:
        info = self.hook_infos.get(i)
        if info is None:
            b = self.bindings[i]
            info = HookInfo(b.name, str(dtype).removeprefix("torch."), row_shape, ragged=b.ragged, source=b.source,
                            shard=b.shard)
            self.hook_infos[i] = info
        return info

    def _gap(self, frame: Frame, name: str, table: RowTable, idx: np.ndarray, reason: str, produced: int = 0,
             filtered: int = 0) -> None:
        """Count rows as dropped and record which (request, position, step) they were; the
        record travels with the step's frame."""
        requests = [table.request_ids[r] for r in table.request[idx]]
        self.acct.dropped(name, len(idx), reason, produced=produced, filtered=filtered, requests=requests)
        self._gap_rows(frame, name, table, idx, reason, requests)

    @staticmethod
    def _gap_rows(frame: Frame, name: str, table: RowTable, idx: np.ndarray, reason: str, requests=None) -> None:
        """Record (not count) which rows are missing, with the step's frame."""
        if requests is None:
            requests = [table.request_ids[r] for r in table.request[idx]]
        frame.gaps.append(GapBlock(name, requests, table.position[idx].astype(np.int64),
                                   np.full(len(idx), frame.step, np.int64), reason))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.acct.error(message)
            log.warning(message)

    # -- user-facing ------------------------------------------------------------------
    @property
    def cache(self):
        """Rows captured so far with the Run API (run[hook], get, stack, ...): a memory sink's in
        place, a file sink's through dmi.open after a flush."""
        from dmi.reader.memory import cache_of

        return cache_of(self)

    def stats(self, per_request: bool = True) -> dict:
        """The session's books; per_request=False leaves out the interventions' per-request
        ranges (a committing sink takes those from `books_provider`)."""
        snap = self.acct.snapshot(self.ring)
        snap["host_copies_per_row"] = self.drain.copies_per_row()
        if self.strict is not None:
            snap["strict"] = list(self.strict.violations)
        if self.edits is not None:
            snap["interventions"] = self.edits.stats(per_request)
        return snap

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything captured so far is written and readable."""
        if self.closed:
            return
        self.adapter.flush()
        self._wait_marker("flush", timeout)

    def _wait_marker(self, kind: str, timeout: float | None) -> bool:
        """Send a marker through drain and sink; wait for it while they live."""
        done = threading.Event()
        if not self.frames.put(Marker(kind, done), urgent=True):
            return False
        limit = CLOSE_TIMEOUT_S if timeout is None else timeout
        waited = 0.0
        while not done.wait(0.05):
            waited += 0.05
            if not self.drain.answering() or waited >= limit:
                # The sink thread answers "stop" and then ends: it may have done both since
                # the wait above timed out, which is an answer, not a dead thread.
                return done.is_set()
        return True

    def engine_failed(self, message: str) -> None:
        """An adapter saw its engine fail (a step raised, or it stopped before it finished
        starting): the run cannot be complete, and its books say why."""
        if self.engine_error is None:
            self.engine_error = message
            self.acct.error(message)
            log.error("dmi: %s; the run will be marked incomplete", message)

    def close(self) -> None:
        """Detach: remove every capture point, write out everything captured, close the sink."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            try:
                self.adapter.flush()
            finally:
                self.adapter.disarm()
        finally:
            if self.strict is not None:
                self.strict.uninstall()
            if self.frame is not None:
                self._seal(self.frame)
            _ARMED.pop(id(self.engine), None)
            self._shutdown(complete=self.engine_error is None)

    detach = close

    def _shutdown(self, complete: bool) -> None:
        self.closed = True
        if self.progress is not None:
            self.progress.stop()
        stopped = self._wait_marker("stop", None)
        self.drain.join(5.0)
        if not stopped:
            self.drain.abandon()
        failed = self.drain.sink_failed is not None or self.drain.error is not None
        try:
            self.sink.close(self.stats(), complete=complete and not failed and stopped)
        except Exception as e:  # a sink that failed before fails again here: report, don't raise
            self.acct.error(f"sink close failed: {type(e).__name__}: {e}")
            log.error("dmi: closing the sink failed: %s; what it committed before stays readable", e)
        finally:
            if stopped:
                self.ring.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dmi.Session {self.adapter.engine_name} hooks={len(self.names)} step={self.step} closed={self.closed}>"


def _close_open_sessions() -> None:
    """A session the program never closed still writes out what it captured at exit.

    Registered when the first session opens, after its sink's libraries (h5py) registered
    their own exit handlers: atexit runs last-registered first, so this runs before they
    close their libraries."""
    for session in list(_ARMED.values()):
        try:
            session.close()
        except Exception as e:  # at exit, report and go on to the next
            log.error("dmi: closing a session at exit failed: %s", e)


_FINALIZED_IN: int | None = None


def _close_at_child_exit() -> None:
    """A multiprocessing child (an engine's worker or core, started by fork) leaves through
    os._exit after its target returns or raises (a Ctrl-C's KeyboardInterrupt too): atexit
    handlers never run there, so its run would stay marked incomplete although it stopped in
    order. multiprocessing's own exit finalizers do run; close there as well (once per process)."""
    global _FINALIZED_IN
    import multiprocessing
    import multiprocessing.util

    if multiprocessing.parent_process() is None or _FINALIZED_IN == os.getpid():
        return
    _FINALIZED_IN = os.getpid()
    multiprocessing.util.Finalize(None, _close_open_sessions, exitpriority=10)


def _predicate(name: str | None):
    if name is None:
        return None
    from dmi.plugins import request_predicates

    found = request_predicates()
    if name not in found:
        raise SpecError("requests.predicate", f"no plugin registers a request predicate named {name!r}; "
                                              f"registered: {', '.join(sorted(found)) or 'none'}")
    return found[name]


__all__ = ["Session", "ConcurrentStepError", "CTRL_WIDTH"]
