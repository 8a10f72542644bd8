"""Worker side: capture next to the model, in the process that runs it.

One WorkerAdapter per worker process installs forward hooks on the loaded model (and, for MoE
top-k, wraps the fused-MoE router's `select_experts` on its instance) and wraps two of the
model runner's methods (instance attributes, removed on disarm):
- `execute_model(scheduler_output)`: one engine step; its `finally` ends the step, also
  when the forward raised, and finished requests leave the row book;
- `_model_forward(...)`: the forward itself, before which the session plans the whole step
  from the runner's batch state (rows.py): the token rows, and the "logits" row group the
  logits processor sees (one row per request).
Under torch.compile the hooks trace into the graph as one `dmi::capture` node each, reading
the plan's tensors (a CUDA graph replays them with each step's plan); both wrapped methods
run outside the graph, so no dmi Python runs inside it.
"""
from __future__ import annotations

import functools
import json
import logging

import numpy as np
import torch

from dmi.adapter import Adapter
from dmi.kernels.capture_op import capture as capture_op
from dmi.plan import LOGITS
from dmi.session import Session

from . import edits as vllm_edits
from .binding import Hooks, VBinding, rank_sink
from .rows import RowBook, external_id
from .tables import read, table_for

log = logging.getLogger("dmi")


class WorkerSession(Session):
    """A session next to the model, in a vLLM worker process."""

    # Armed at model load (additional_config): true until the engine's warm-up returns. An
    # engine that dies before then (KV cache, warm-up) closes the session at exit or shutdown,
    # and that run must not read as a complete one that saw no requests.
    starting = False

    def close(self) -> None:
        if self.starting and not self.closed:
            self.engine_failed("the vLLM engine stopped before it finished starting (dmi armed it at model load)")
        super().close()


class WorkerAdapter(Adapter):
    engine_name = "vllm"
    supports_interventions = True

    def __init__(self, worker, family: str | None = None):
        runner = worker.model_runner
        super().__init__(runner)
        self.worker = worker
        self.runner = runner
        cfg = runner.model_config
        self.hf_config = cfg.hf_config
        table = worker_table(self.hf_config.model_type, family)
        self.tp_size, self.tp_rank = tp_rank_of(worker)
        self.hooks = Hooks(table, self.hf_config, cfg.dtype, self.tp_size, self.tp_rank)
        self.dims = self.hooks.dims
        self.session = None
        self.book = RowBook()
        self._handles: list = []
        self._wrapped: list[str] = []
        self._methods: list[tuple[object, str]] = []
        self._in_step = False
        self._sched = None
        self._names: dict[str, str] = {}   # engine id -> row id (dmi.serve.names)
        self.requests = None               # dmi.serve.engine.RequestTable, once armed

    @property
    def device(self) -> torch.device:
        return torch.device(self.runner.device)

    def describe(self) -> tuple[str, dict]:
        return str(self.runner.model_config.model), self.hf_config.to_dict()

    def run_attrs(self) -> dict:
        return {"tp_rank": self.tp_rank, "tp_size": self.tp_size} if self.tp_size > 1 else {}

    def resolve(self, patterns):
        return self.hooks.resolve(patterns)

    def bind(self, patterns):
        return self.hooks.bind(patterns)

    def editable(self, b: VBinding) -> str | None:
        return vllm_edits.not_editable(b.tap, self.tp_size)

    # The compiled graph holds the edit table for the engine's lifetime: sized once for the
    # largest step, never replaced (a larger step is refused loudly, never run unsteered).
    edit_table_grows = False

    @property
    def edit_rows(self) -> int:
        return int(getattr(self.worker.vllm_config.scheduler_config, "max_num_batched_tokens", 0) or 0)

    # -- arming ------------------------------------------------------------------------
    def arm(self, session, bindings: list[VBinding]) -> None:
        from dmi.serve.engine import RequestTable

        self.session = session
        self.requests = RequestTable(session.names, session.edits.banks if session.edits is not None else None)
        session.planner.enable_request_masks(self.requests.masks)
        self.book.started = {self._name(r) for r in self.runner.input_batch.req_ids}
        # The plan's tensors, held here for the graph: a compiled graph keeps the capture points
        # it traced after disarm, so what they read must outlive the session (disarm zeroes the
        # plan: inert, they write nothing).
        self._ring, self._control = session.ring.buffer, session.planner.control
        model = self.runner.model
        by_method: dict[tuple[int, str], tuple[object, list]] = {}
        edited = session.edits.hooks if session.edits is not None else {}
        points = [(i, b, edited.get(b.name)) for i, b in enumerate(bindings)]
        points += [(None, he.binding, he) for he in edited.values() if he.capture is None]
        for i, b, he in points:
            if he is None:
                fn = functools.partial(self._hook, i, b)
            else:  # the edit table, like the plan's tensors, is held for the graph's lifetime
                self._sel = session.edits.sel
                fn = functools.partial(vllm_edits.hook, i, he, self.dims, self._sel, self._capture)
            if b.tap.method is not None:
                obj = functools.reduce(getattr, b.path.split("."), model)
                by_method.setdefault((id(obj), b.tap.method), (obj, []))[1].append(fn)
                continue
            mod = model.get_submodule(b.path)
            if b.tap.pre:
                h = mod.register_forward_pre_hook(lambda m, a, k, _fn=fn: _fn(a, k, None), with_kwargs=True)
            else:
                h = mod.register_forward_hook(lambda m, a, k, o, _fn=fn: _fn(a, k, o), with_kwargs=True)
            self._handles.append(h)
        for (_, name), (obj, fns) in by_method.items():
            self._wrap_method(obj, name, fns)
        self._wrap("execute_model", self._execute_model)
        self._wrap("_model_forward", self._model_forward)

    def _wrap(self, name: str, fn) -> None:
        original = getattr(self.runner, name)
        setattr(self.runner, name, functools.partial(fn, original))
        self._wrapped.append(name)

    def _wrap_method(self, obj, name: str, fns: list) -> None:
        """Capture what obj.name returns (an instance attribute, removed on disarm)."""
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            ret = original(*args, **kwargs)
            for fn in fns:
                fn((), {}, ret)
            return ret

        setattr(obj, name, wrapper)
        self._methods.append((obj, name))

    def disarm(self) -> None:
        if getattr(self, "_control", None) is not None:
            self._control.ctrl_np[:] = 0
            self._control.send()
        # A compiled graph looks its hooks up in the modules' hook dicts when it runs:
        # removing them breaks it. They stay, inert: no bridge, no session.
        if not self._compiled():
            for h in self._handles:
                h.remove()
            self._handles.clear()
        for name in self._wrapped:
            self.runner.__dict__.pop(name, None)
        self._wrapped.clear()
        if not self._compiled():
            for obj, name in self._methods:
                obj.__dict__.pop(name, None)
            self._methods.clear()
        self.session = None

    def _compiled(self) -> bool:
        from vllm.config import CompilationMode

        return self.worker.vllm_config.compilation_config.mode != CompilationMode.NONE

    # -- per step ------------------------------------------------------------------------
    def _execute_model(self, original, scheduler_output, *args, **kwargs):
        self._sched = scheduler_output
        try:
            return original(scheduler_output, *args, **kwargs)
        except BaseException as e:
            # vLLM ends its engine on this (EngineDeadError in the caller); the worker's session is
            # then closed at shutdown or exit, and must not mark the run complete.
            if self.session is not None:
                self.session.engine_failed(f"the vLLM engine raised in step {self.session.step}: "
                                           f"{type(e).__name__}: {e}")
            raise
        finally:
            if self._in_step:
                self._in_step = False
                self.session.end_step()
            self._sched = None
            self._forget(getattr(scheduler_output, "finished_req_ids", ()) or ())

    def _name(self, req_id: str) -> str:
        """The row id of engine request `req_id`: what the front end named it (dmi.serve),
        else its external id."""
        name = self._names.get(req_id)
        if name is None:
            from dmi.serve.engine import KEY, decode

            state = getattr(self.runner, "requests", {}).get(req_id)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            info = decode(extra.get(KEY))
            name = served_name(req_id, info) if info else external_id(req_id)
            self._names[req_id] = name
            if self.requests is not None:
                self.requests.add(name, info)
        return name

    def _forget(self, finished) -> None:
        names = [self._names.pop(r, None) or external_id(r) for r in finished]
        self.book.forget(names)
        if self.requests is not None:
            for n in names:
                self.requests.forget(n)

    def _model_forward(self, original, *args, **kwargs):
        session = self.session
        positions = kwargs.get("positions")
        if session is None or self._sched is None or positions is None or positions.dim() != 1:
            return original(*args, **kwargs)
        self._begin(positions)
        return original(*args, **kwargs)

    def _begin(self, positions: torch.Tensor) -> None:
        batch = self.runner.input_batch
        req_ids = list(batch.req_ids)
        n = len(req_ids)
        counts = np.array([self._sched.num_scheduled_tokens[r] for r in req_ids], dtype=np.int64)
        rows = self.book.step(req_ids, counts, positions.detach().cpu().numpy(),
                              batch.num_tokens_no_spec[:n], batch.num_prompt_tokens[:n],
                              names=[self._name(r) for r in req_ids])
        s = self.session
        logits = [i for i, b in enumerate(s.bindings) if b.group == LOGITS]
        tokens = [i for i, b in enumerate(s.bindings) if b.group != LOGITS]
        for rid, pos, why in rows.skipped:  # only a logits row's own position can be a logits gap
            s.not_computed(rid, pos, why, hooks=tokens, edits=True)
        for rid, pos, why in rows.skipped_logits:
            s.not_computed(rid, pos, why, hooks=logits)
        self.session.begin_step(rows.tokens, {LOGITS: rows.logits})
        self._in_step = True

    def _hook(self, i: int, b: VBinding, args, kwargs, out) -> None:
        if self.session is None or not self.session.wants(i):
            return  # before read: a residual sum or scaling would be computed for nothing
        x = read(b.tap, self.dims, args, kwargs, out, b.factor)
        if x is None:
            return
        self._capture(i, x)

    def _capture(self, i: int, x: torch.Tensor) -> None:
        if torch.compiler.is_compiling():  # traced: one dmi::capture node reading the plan's tensors
            capture_op(self._ring, x, self._control.rows, self._control.ctrl, i)
        elif self.session is not None:
            self.session.capture(i, x, flat=True)


def worker_table(model_type: str, family: str | None = None):
    """This process's table for the model: the built-ins and every plugin's (dmi_arch_tables), looked
    up exactly as the caller's process does. `family`: the table the caller validated the spec
    against; a worker that resolves another (a plugin registered only in the caller's process)
    refuses rather than capture different rows under the same names."""
    from dmi import plugins
    from dmi.errors import EngineNotSupportedError

    tables = plugins.arch_tables("vllm")
    table = table_for(model_type, tables)
    if table is not None and (family is None or table.family == family):
        return table
    reach = ("A table registered at run time (dmi.plugins.manager().register) reaches only its own process; "
             "ship it in a package with a `dmi` entry point (dmi_arch_tables) so every vLLM process loads it")
    if table is None:
        known = sorted({t for tb in tables for t in tb.model_types})
        raise EngineNotSupportedError(f"dmi has no vLLM architecture table for model_type {model_type!r} in this "
                                      f"worker process (known: {', '.join(known)}). {reach}")
    raise EngineNotSupportedError(f"dmi: this vLLM worker process resolves model_type {model_type!r} to table "
                                  f"{table.family!r}, but the caller validated the spec against table {family!r}. "
                                  f"{reach}")
def served_name(req_id: str, info: dict) -> str:
    """The row id of an engine request the dmi front end sent (dmi/serve/names.py). vLLM's
    engine ids: "<external>-<8 random>"; a completion's external id is "<response id>-<prompt>";
    with n > 1 each choice j is a child "<j>_<parent's engine id>"."""
    from dmi.serve.names import row_name

    ext = external_id(req_id)
    choice = 0
    if int(info.get("n", 1) or 1) > 1:
        head, _, rest = ext.partition("_")
        if head.isdigit() and rest:
            choice, ext = int(head), rest
    prompt = 0
    if info.get("kind") == "completions":
        tail = ext.rsplit("-", 1)[-1]
        prompt = int(tail) if tail.isdigit() else 0
    return row_name(str(info["uid"]), prompt, choice)


# -- the worker's RPC methods (added to vLLM's worker class by vllm_plugin) ---------------
_SESSIONS: dict[int, WorkerSession] = {}   # id(worker) -> its session
_CHANNELS: dict[int, object] = {}          # id(worker) -> its dmi.serve ServeChannel


def tp_rank_of(worker) -> tuple[int, int]:
    """(tensor-parallel size, this worker's rank in it)."""
    size = worker.vllm_config.parallel_config.tensor_parallel_size
    if size == 1:
        return 1, 0
    from vllm.distributed import get_tensor_model_parallel_rank

    return size, get_tensor_model_parallel_rank()


def open_session(worker, spec_json: str, family: str | None = None, served: bool = False) -> str:
    from dmi import plugins
    from dmi.errors import SessionStateError
    from dmi.spec import CaptureSpec

    if id(worker) in _SESSIONS:
        raise SessionStateError("this vLLM worker already has an open dmi session")
    spec = CaptureSpec.parse(json.loads(spec_json))
    adapter = WorkerAdapter(worker, family)
    if served:  # armed at construction for the API server: the operator's policy says who may steer
        from dmi.serve.policy import ServePolicy

        from .vllm_plugin import served_config

        adapter.serve_policy = ServePolicy.parse(served_config(worker.vllm_config.additional_config)[1])
    tp_size, rank = tp_rank_of(worker)
    sink = plugins.sink_for(rank_sink(spec.sink, rank, tp_size))
    session = WorkerSession(worker.model_runner, adapter, spec, sink)
    _SESSIONS[id(worker)] = session
    from dmi.serve.engine import ServeChannel, run_path

    # Every rank answers served flushes for its own file and stops if the front end dies.
    _CHANNELS[id(worker)] = ServeChannel(session, run_path(spec.sink), rank, tp_size, served)
    return json.dumps({"hooks": session.names, "rank": adapter.tp_rank})


def _stats(session) -> str:
    return json.dumps(session.stats(), default=_plain)


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def session_stats(worker) -> str:
    s = _SESSIONS.get(id(worker))
    return _stats(s) if s is not None else "null"


def session_flush(worker, timeout=None) -> bool:
    s = _SESSIONS.get(id(worker))
    if s is not None:
        s.flush(timeout)
    return s is not None


def close_session(worker) -> str:
    channel = _CHANNELS.pop(id(worker), None)
    if channel is not None:
        channel.stop()
    s = _SESSIONS.pop(id(worker), None)
    if s is None:
        return "null"
    s.close()
    return _stats(s)
