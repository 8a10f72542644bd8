"""Scheduler-side control of the dmi session: opened at construction (DMI_SPEC) or through
the Engine's collective_rpc, steered (stats, flush, close) through the same RPC.

collective_rpc carries only flat scalars and returns only success or an error message, so
requests carry the spec as JSON and a `reply` path where the answer is written as JSON.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict

from dmi.errors import EngineNotSupportedError, SessionStateError
from dmi.tp import rank_sink

log = logging.getLogger("dmi")

RPC_METHOD = "dmi_control"
ENV_SPEC = "DMI_SPEC"
ENV_SERVED = "DMI_SERVED"   # set by dmi's served front end before the schedulers start

# This process's state: one model runner, at most one session on it.
_STATE: dict = {"runner": None, "adapter": None, "session": None, "armed_at_start": False, "channel": None}

# Row ids (dmi/serve/names.py). SGLang refuses a rid while a request with it runs, but takes
# it again once that request ended: each new request (Req) is named when the scheduler
# creates it, so a rid maps to its live request's row id and two requests never merge.
_NAMES: "OrderedDict[str, str]" = OrderedDict()      # live rid -> row id
_USED: "OrderedDict[str, None]" = OrderedDict()      # row ids the open run may hold (see open_session)
_INFO: "OrderedDict[str, dict]" = OrderedDict()      # row id -> the front end's request info
_COUNTS: "OrderedDict[str, list[int]]" = OrderedDict()  # uid -> [prefix requests, samples] seen
_LIMIT = 1 << 16


def _put(d: OrderedDict, key, value) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > _LIMIT:
        d.popitem(last=False)


def new_request(req) -> None:
    """Name a request the scheduler just created (Req.__init__)."""
    from dmi.serve.engine import KEY, decode
    from dmi.serve.names import PREFIX
    from dmi.serve.names import row_name as served

    from .rows import HEALTH_CHECK_PREFIX

    rid = str(getattr(req, "rid", ""))
    if not rid or rid.startswith(HEALTH_CHECK_PREFIX):
        return
    sp = getattr(req, "sampling_params", None)
    info = decode((getattr(sp, "custom_params", None) or {}).get(KEY))
    if info is not None and "uid" in info:
        # One HTTP request arrives as its requests in order: with n > 1, first one prefill-only
        # request per prompt (max_new_tokens 0, the shared prompt), then prompt by prompt its n samples.
        uid, n = str(info["uid"]), int(info.get("n", 1) or 1)
        counts = _COUNTS.get(uid) or [0, 0]
        if n > 1 and getattr(sp, "max_new_tokens", None) == 0:
            name = served(uid, counts[0], PREFIX)
            counts[0] += 1
        else:
            name = served(uid, counts[1] // n, counts[1] % n)
            counts[1] += 1
        _put(_COUNTS, uid, counts)
        _put(_INFO, name, info)
    else:
        # Per run: a rid is its own row id unless this run may already hold rows under it
        # (an earlier request with the rid); then the next free "<rid>#<k>".
        name, k = rid, 0
        while name in _USED:
            k += 1
            name = f"{rid}#{k}"
    _put(_USED, name, None)
    _put(_NAMES, rid, name)


def row_name(rid: str) -> str:
    return _NAMES.get(rid, rid)


def request_info(name: str) -> dict | None:
    return _INFO.get(name)


class CudaGraphAttachError(SessionStateError):
    pass


def register_runner(runner) -> None:
    """Called once the target model is loaded (draft models of speculative decoding are skipped)."""
    _STATE["runner"] = runner


def current_adapter():
    return _STATE["adapter"]


def _graphs_captured(runner) -> bool:
    return getattr(runner, "decode_cuda_graph_runner", None) is not None or (
        getattr(runner, "prefill_cuda_graph_runner", None) is not None
        and type(runner.prefill_cuda_graph_runner).__name__ != "EagerRunner")


def _new_run(scheduler) -> None:
    """A run starts: a request's rid names its rows again, except for requests already queued
    or running, whose rows (under the names they have) may reach this run."""
    alive = in_flight(scheduler) | {str(r.rid) for r in list(getattr(scheduler, "waiting_queue", None) or [])
                                    if getattr(r, "rid", None) is not None}
    _USED.clear()
    for rid in alive:
        _put(_USED, row_name(rid), None)


def in_flight(scheduler) -> set[str]:
    """Requests the scheduler is running now (their KV holds positions computed unwatched)."""
    if scheduler is None:
        return set()
    reqs = list(getattr(getattr(scheduler, "running_batch", None), "reqs", None) or [])
    reqs += list(getattr(getattr(scheduler, "last_batch", None), "reqs", None) or [])
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        reqs.append(chunked)
    return {str(r.rid) for r in reqs if getattr(r, "rid", None) is not None}


def open_session(spec_json: str, at_start: bool = False, scheduler=None, family: str = "") -> dict:
    """`family`: the table the caller validated the spec against ("" when armed from DMI_SPEC)."""
    from dmi import plugins
    from dmi.session import Session
    from dmi.spec import CaptureSpec

    from .worker import SGLangWorkerAdapter, table_for

    runner = _STATE["runner"]
    if runner is None:
        raise SessionStateError("dmi: this SGLang scheduler has no model runner registered (the dmi plugin was "
                                "not loaded when the model loaded)")
    if _STATE["session"] is not None:
        raise SessionStateError("this engine already has an open dmi session; leave it (session.close()) first")
    if not at_start and _graphs_captured(runner):
        raise CudaGraphAttachError(
            "dmi: this SGLang engine runs CUDA graphs, which replay without Python, so hooks installed now "
            "would never run. Arm dmi at construction: set the environment variable DMI_SPEC to the spec "
            "(JSON) before creating the Engine or launching the server, then dmi.attach(engine) with no "
            "spec; or start the engine with disable_cuda_graph=True")
    spec = CaptureSpec.parse(spec_json)
    cfg = runner.model_config.hf_config
    table = table_for(cfg, plugins.arch_tables("sglang"))  # built-ins and any plugin's tables
    if table is None or (family and table.family != family):
        arch = (getattr(cfg, "architectures", None) or ["?"])[0]
        have = "no SGLang architecture table" if table is None else f"table {table.family!r}"
        want = f", but the caller validated the spec against table {family!r}" if family else ""
        raise EngineNotSupportedError(
            f"dmi: this SGLang scheduler process has {have} for {arch!r}{want}. A table registered at run time "
            f"(dmi.plugins.manager().register) reaches only its own process; ship it in a package with a `dmi` "
            f"entry point (dmi_arch_tables) so the scheduler loads it too")
    tp_size, rank = tp_rank()
    _new_run(scheduler)
    adapter = SGLangWorkerAdapter(runner, table, model_path=str(getattr(runner.model_config, "model_path", "")),
                                  in_flight=in_flight(scheduler), tp=(tp_size, rank))
    if at_start and os.environ.get("DMI_SERVE"):  # a served engine: the operator's policy says who may steer
        from dmi.serve.policy import ServePolicy

        adapter.serve_policy = ServePolicy.parse(os.environ["DMI_SERVE"])
    session = Session(runner, adapter, spec, plugins.sink_for(rank_sink(spec.sink, rank, tp_size)))
    from dmi.serve.engine import ServeChannel, run_path

    # Every rank watches the front end (and closes when it dies) and answers served flushes
    # for its own file.
    _STATE.update(adapter=adapter, session=session, armed_at_start=at_start,
                  channel=ServeChannel(session, run_path(spec.sink), rank, tp_size,
                                         served=bool(os.environ.get(ENV_SERVED))))
    log.info("dmi: capturing %d hooks into %s", len(session.names), spec.sink)
    return {"hooks": session.names, "rank": rank}


def tp_rank() -> tuple[int, int]:
    """(tensor-parallel size, this scheduler's rank in it): every rank runs its own scheduler."""
    from sglang.srt.distributed import parallel_state as ps

    try:
        return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    except (AssertionError, AttributeError):  # no parallel groups initialised: one process
        return 1, 0


def reply_path(reply: str, rank: int) -> str:
    """Where rank `rank` writes its answer: every rank's scheduler runs the same RPC."""
    return reply if rank == 0 else f"{reply}.rank{rank}"


def arm_from_env() -> None:
    """Open the DMI_SPEC session. The caller's process validated the spec and the sink
    already; whatever still fails here is logged and kept for dmi.attach to report: raising
    would make SGLang take the whole engine down. A served engine (dmi's front end set
    DMI_SERVED) does raise: its clients would otherwise get requests served without the capture
    or steering they asked for."""
    spec = os.environ.get(ENV_SPEC)
    if spec and _STATE["session"] is None:
        try:
            open_session(spec, at_start=True)
        except Exception as e:
            _STATE["arm_error"] = f"{type(e).__name__}: {e}"
            if os.environ.get(ENV_SERVED):
                log.error("dmi: arming the served engine (DMI_SPEC) failed; the server stops: %s", e)
                raise
            log.error("dmi: arming at construction (DMI_SPEC) failed; the engine serves without capture: %s", e)


def flush_if_idle(scheduler) -> None:
    s = _STATE["session"]
    if s is None or s.step == _STATE.get("flushed_step"):
        return
    idle = getattr(scheduler, "is_fully_idle", None)
    if idle is not None and not idle():
        return
    s.flush()
    _STATE["flushed_step"] = s.step


def handle(op: str, spec: str = "", timeout: float = -1.0, scheduler=None, family: str = "") -> dict:
    s = _STATE["session"]
    if op == "status":
        return {"open": s is not None, "armed_at_start": _STATE["armed_at_start"], "arm_error": _STATE.get("arm_error"),
                "spec": s.spec.to_json() if s is not None else None}
    if op == "open":
        return open_session(spec, scheduler=scheduler, family=family)
    if s is None:
        if op == "close":
            return {"stats": None}
        raise SessionStateError(f"dmi: no session is open in the scheduler (op {op!r})")
    if op == "stats":
        return {"stats": s.stats()}
    if op == "flush":
        s.flush(None if timeout < 0 else timeout)
        return {}
    if op == "close":
        if _STATE.get("channel") is not None:
            _STATE["channel"].stop()
        _STATE.update(adapter=None, session=None, armed_at_start=False, channel=None)
        s.close()
        return {"stats": s.stats()}
    raise ValueError(f"dmi: unknown control op {op!r}")


def rpc(scheduler, op: str, reply: str, spec: str = "", timeout: float = -1.0, family: str = "") -> None:
    """Scheduler method behind collective_rpc("dmi_control", ...). Errors travel back as the
    RPC's message, prefixed with their type so the caller can raise the same kind."""
    try:
        out = handle(op, spec, timeout, scheduler, family)
        err = None
    except Exception as e:
        out, err = None, {"type": type(e).__name__, "message": str(e), "value_error": isinstance(e, ValueError)}
        log.error("dmi: %s failed: %s", op, e)
    if reply:
        reply = reply_path(reply, tp_rank()[1])
        tmp = reply + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ok": err is None, "result": out, "error": err}, f, default=str)
        os.replace(tmp, reply)
