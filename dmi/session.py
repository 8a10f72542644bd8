"""A capture session: owns the ring, the drain and the sink for one attached engine.

The adapter drives it once per engine step: begin_step(rows) before the forward,
capture(i, tensor) from inside it (through the capture op), end_step() after.
"""
from __future__ import annotations

import atexit
import logging
import math
import threading
import weakref

import numpy as np
import torch

from dmi import __version__
from dmi.drain import Drain
from dmi.errors import RingTooSmallError, SessionStateError, SpecError
from dmi.kernels.capture_op import CTRL_WIDTH, capture as capture_op
from dmi.policies import Accounting, RowFilter
from dmi.ring import FrameRing, PayloadRing, Slot, StepPlan
from dmi.ring.frames import Marker, RowTable
from dmi.ring.upload import PinnedUpload
from dmi.sinks.base import GapBlock, HookInfo, RunMeta

log = logging.getLogger("dmi")

# One session per engine: a second would interleave two books on one set of hooks.
_ARMED: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()

BLOCK_TIMEOUT_S = 60.0  # `block` waits this long for ring space before counting a drop


class Session:
    def __init__(self, engine, adapter, spec, sink, progress: bool = False):
        self.engine = engine
        self.adapter = adapter
        self.spec = spec
        self.closed = False
        self._lock = threading.Lock()
        if id(engine) in _ARMED:
            raise SessionStateError("this engine already has an open dmi session; leave it (session.close()) first")

        # Validate everything before touching the engine, so bad input leaves it as it was.
        self.bindings = adapter.bind(spec.hooks)
        need = sum(PayloadRing.aligned(b.row_bytes) for b in self.bindings)
        if need > spec.ring.bytes:
            raise RingTooSmallError(
                "ring.bytes", f"{spec.ring.bytes} bytes cannot hold one token row of the selected hooks "
                f"({need} bytes for {len(self.bindings)} hooks); raise ring.bytes to at least {need}, "
                f"or select fewer hooks")
        self.names = [b.name for b in self.bindings]
        self.fallback_hooks = self._check_fallback(spec)
        self.filter = RowFilter(spec, predicate=_predicate(spec.requests.predicate))
        self.degraded = False
        self._waits_seen = 0
        self.acct = Accounting()
        self.sink = sink

        name, config = adapter.describe()
        self.ring = PayloadRing(spec.ring.bytes, device=adapter.device)
        self._on_gpu = self.ring.buffer.device.type == "cuda"
        self._upload = PinnedUpload(self.ring.buffer.device) if self._on_gpu else None
        self._graph = None
        self.ctrl = torch.zeros((len(self.bindings), CTRL_WIDTH), dtype=torch.int64)
        self._ctrl_np = self.ctrl.numpy()  # same memory; numpy stores cost 0.1 us, tensor stores 2 us
        self.frames = FrameRing()
        self.hook_infos: dict[int, HookInfo] = {}
        sink.open(RunMeta(dmi_version=__version__, engine=adapter.engine_name, model=name, model_config=config,
                          spec_json=spec.to_json(),
                          extra={"hooks": self.names, "sources": [b.source for b in self.bindings],
                                 **adapter.run_attrs()}))
        self.drain = Drain(self.ring, self.frames, sink, self.acct, self.hook_infos,
                           host_bytes=spec.ring.bytes)
        self.drain.start()
        self.step = 0
        self.plan: StepPlan | None = None
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
        atexit.unregister(_close_open_sessions)
        atexit.register(_close_open_sessions)

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

    # -- driven by the adapter, on the engine's thread ---------------------------------
    def begin_step(self, rows: RowTable) -> None:
        keep, fallback = self.filter.keep(self.step, rows)
        if fallback is not None:
            self._update_degrade()
        self.plan = StepPlan(self.step, rows, keep, reduced=fallback if self.degraded else None)

    def _update_degrade(self) -> None:
        """Hysteresis between the watermarks: switch to the fallback above `high`, back below `low`.
        A step whose capture had to wait for ring space counts as a full ring: at step start the
        drain may just have freed the space the engine waited for, so fill alone can stay below
        `high` while every step stalls."""
        waited = self.ring.waits != self._waits_seen
        self._waits_seen = self.ring.waits
        fill = 1.0 if waited else self.ring.fill()
        d = self.spec.degrade
        if not self.degraded and fill >= d.high:
            self.degraded = True
            self.acct.switched(self.step, "fallback", fill)
            log.warning("dmi: ring %.0f%% full at step %d: capturing the degrade fallback only", 100 * fill, self.step)
        elif self.degraded and fill <= d.low:
            self.degraded = False
            self.acct.switched(self.step, "spec", fill)

    def end_step(self) -> None:
        if self.plan is not None:
            if self._on_gpu and self.plan.stream is not None:
                ev = torch.cuda.Event()
                ev.record(self.plan.stream)  # the drain waits on this, never on the stream
                self.plan.done_event = ev
            self.plan = None
            self.frames.seal()
            self.step += 1
            self.acct.steps = self.step

    def capture(self, i: int, x: torch.Tensor, flat: bool = False, rows: np.ndarray | None = None) -> None:
        """Capture hook i's tensor: [batch, t, ...] holding the step's last t tokens of each
        batch row, or [batch*t, ...] when flat; or, with `rows`, [n, ...] whose row k is the
        step's RowTable row rows[k] (-1 for padding), e.g. one logits row per request."""
        plan = self.plan
        if plan is None or self.closed:
            return
        name = self.names[i]
        B, T = plan.rows.batch, plan.rows.tokens
        if rows is not None:
            t, rows_x = T, x
            ok = x.dim() >= 1 and x.shape[0] == len(rows)
        elif flat:
            t = x.shape[0] // B if B else 0
            rows_x = x
            ok = x.shape[0] == B * t
        else:
            t = x.shape[1] if x.dim() > 1 else 0
            rows_x = x.flatten(0, 1) if x.dim() > 1 else x
            ok = x.dim() > 1 and x.shape[0] == B
        if not ok or not 0 < t <= T:
            self._warn_once(name, f"dmi: {name}: tensor of shape {tuple(x.shape)} does not map onto the step's "
                                  f"{B}x{T} token rows; its rows are dropped and recorded (reason 'shape')")
            sel = plan.select(T)
            self._gap(name, sel.token_idx, plan, "shape", produced=sel.produced, filtered=sel.filtered)
            return
        fallback = i in self.fallback_hooks
        sel = plan.select(t, fallback) if rows is None else plan.select_rows(rows, fallback)
        if self.drain.sink_failed is not None:
            # Nothing can be written any more: stop copying, keep counting (reported once).
            self.acct.dropped(name, len(sel.token_idx) + len(sel.lost_idx), "sink_error", produced=sel.produced,
                              filtered=sel.filtered)
            return
        info = self._info(i, rows_x)
        if len(sel.lost_idx):
            self._gap(name, sel.lost_idx, plan, "degraded")
        n = len(sel.token_idx)
        if n == 0:
            self.acct.captured(name, sel.produced, sel.filtered, 0, 0)
            return
        row_bytes = math.prod(rows_x.shape[1:]) * rows_x.element_size()
        nbytes = n * row_bytes
        # `degrade` blocks once reduced to its fallback: the fallback is the declared minimum.
        off = self.ring.alloc(nbytes, wait=self.spec.overload != "drop", timeout=BLOCK_TIMEOUT_S,
                              alive=self.drain.alive, before_wait=self.frames.seal)
        if off is None:
            self.frames.seal()  # let the drain free what this step already wrote
            self._drop(name, sel, plan, nbytes)
            return
        self._ctrl_np[i] = (1, off, n)
        src = sel.src_rows
        if self._on_gpu:
            self._track_stream(plan)
            if sel.src_dev is None:
                sel.src_dev = self._upload.put(sel.src_rows.numpy())
            src = sel.src_dev
        capture_op(self.ring.buffer, rows_x, src, self.ctrl, i)
        self.acct.captured(name, sel.produced, sel.filtered, n, nbytes)
        self.frames.put(Slot(plan, i, off, nbytes, tuple(rows_x.shape[1:]), rows_x.dtype, sel.token_idx,
                             pattern_batch=sel.token_idx // T if info.ragged else None))

    def _track_stream(self, plan: StepPlan) -> None:
        """GPU: the stream this step's captures are enqueued on; end_step records its event there."""
        if plan.stream is None:
            plan.stream = torch.cuda.current_stream(self.ring.buffer.device)

    def not_computed(self, request_id: str, positions, reason: str = "prefix_cache") -> None:
        """Record that the engine did not compute these positions of a request (served from a
        prefix cache), for every hook: a reader sees them as gaps with `reason`, never as silently
        missing. They were never produced, so produced = filtered + written + dropped is unchanged;
        stats()["not_computed"] counts them per reason."""
        pos = np.asarray(positions, dtype=np.int64)
        if self.closed or not len(pos):
            return
        self.acct.skipped(len(pos) * len(self.names), reason)
        for name in self.names:
            self.frames.put(GapBlock(name, [request_id] * len(pos), pos, np.full(len(pos), self.step, np.int64), reason))

    def _info(self, i: int, rows_x: torch.Tensor) -> HookInfo:
        return self._info_from(i, rows_x.dtype, tuple(rows_x.shape[1:]))

    def _info_from(self, i: int, dtype: torch.dtype, row_shape: tuple[int, ...]) -> HookInfo:
        info = self.hook_infos.get(i)
        if info is None:
            b = self.bindings[i]
            info = HookInfo(b.name, str(dtype).removeprefix("torch."), row_shape, ragged=b.ragged, source=b.source,
                            shard=b.shard)
            self.hook_infos[i] = info
        return info

    def graph_plan(self):
        """The device-side plan for captures inside CUDA graphs (dmi.ring.graphplan), made once."""
        if self._graph is None:
            from dmi.ring.graphplan import GraphPlan

            self._graph = GraphPlan(self)
        return self._graph

    def _drop(self, name: str, sel, plan: StepPlan, nbytes: int) -> None:
        if PayloadRing.aligned(nbytes) > self.ring.capacity:
            reason = "oversize"
            self._warn_once("oversize:" + name, f"dmi: {name}: one step's rows need {nbytes} bytes, more than "
                                                f"ring.bytes={self.ring.capacity}; those rows are dropped and "
                                                f"recorded as gaps. Raise ring.bytes.")
        elif not self.drain.alive():
            reason = "drain_stopped"
        else:
            reason = "ring_full"
        self._gap(name, sel.token_idx, plan, reason, produced=sel.produced, filtered=sel.filtered)

    def _gap(self, name: str, token_idx: np.ndarray, plan: StepPlan, reason: str, produced: int = 0,
             filtered: int = 0) -> None:
        """Count rows as dropped and record which (request, position, step) they were."""
        t = plan.rows
        requests = [t.request_ids[r] for r in t.request[token_idx]]
        n = len(token_idx)
        self.acct.dropped(name, n, reason, produced=produced, filtered=filtered, requests=requests)
        self.frames.put(GapBlock(name, requests, t.position[token_idx].astype(np.int64),
                                 np.full(n, plan.step, np.int64), reason))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.acct.error(message)
            log.warning(message)

    # -- user-facing ------------------------------------------------------------------
    def stats(self) -> dict:
        return self.acct.snapshot(self.ring)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything captured so far is written and readable."""
        if self.closed:
            return
        self.adapter.flush()
        done = threading.Event()
        self.frames.put(Marker("flush", done))
        done.wait(timeout)

    def close(self) -> None:
        """Detach: remove every capture point, write out everything captured, close the sink."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.plan = None
        try:
            try:
                self.adapter.flush()
            finally:
                self.adapter.disarm()
        finally:
            _ARMED.pop(id(self.engine), None)
            self._shutdown(complete=True)

    detach = close

    def _shutdown(self, complete: bool) -> None:
        self.closed = True
        if self.progress is not None:
            self.progress.stop()
        done = threading.Event()
        self.frames.put(Marker("stop", done))
        done.wait()
        self.drain.join()
        failed = self.drain.sink_failed is not None
        try:
            self.sink.close(self.acct.snapshot(self.ring), complete=complete and not failed)
        except Exception as e:  # a sink that failed before fails again here: report, don't raise
            self.acct.error(f"sink close failed: {type(e).__name__}: {e}")
            log.error("dmi: closing the sink failed: %s; what it committed before stays readable", e)
        finally:
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


def _predicate(name: str | None):
    if name is None:
        return None
    from dmi.plugins import request_predicates

    found = request_predicates()
    if name not in found:
        raise SpecError("requests.predicate", f"no plugin registers a request predicate named {name!r}; "
                                              f"registered: {', '.join(sorted(found)) or 'none'}")
    return found[name]
