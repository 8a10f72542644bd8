"""vLLM `general_plugins` entry point: runs in every vLLM process (front end, EngineCore,
each worker) before any model exists, possibly more than once per process.

- Adds dmi's RPC methods to vLLM's worker base class, so `LLM.collective_rpc("dmi_open", ...)`
  reaches them by name: no pickled callables, no insecure serialization.
- Wraps the worker's `load_model`: when the engine was built with
  `additional_config={"dmi": spec}`, the worker opens its session right after the model
  loads, before vLLM compiles it, so the capture points become part of the compiled graph.
- Wraps the worker's `shutdown` so an armed session (a served engine) writes out its file.
- In the OpenAI-compatible API server, when it is armed, adds dmi's front end
  (dmi/serve/asgi.py): per-request specs, unique row ids, `/v1/dmi/...`.
"""
from __future__ import annotations

import functools
import json
import logging

log = logging.getLogger("dmi")

RPC = {
    "dmi_open": "open_session",
    "dmi_stats": "session_stats",
    "dmi_flush": "session_flush",
    "dmi_close": "close_session",
}


def register() -> None:
    from dmi.serve.engine import mark_front_end

    mark_front_end()
    _patch_api_server()
    try:
        from vllm.v1.worker.worker_base import WorkerBase
    except ImportError:  # a vLLM without the v1 worker: dmi's adapter refuses it at attach
        return
    if getattr(WorkerBase, "_dmi_registered", False):
        return
    from . import worker as w

    for method, fn in RPC.items():
        setattr(WorkerBase, method, _rpc(getattr(w, fn)))
    WorkerBase.dmi_armed = _rpc(_armed)
    WorkerBase._dmi_registered = True
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:
        return
    _patch(Worker, "load_model", _after_load)
    _patch(Worker, "shutdown", _before_shutdown)


def _patch_api_server() -> None:
    """Add dmi's middleware when vLLM's API server builds its app (only in that process: the
    module is imported there before the engine config, and so this plugin, loads)."""
    import sys

    app_mod = sys.modules.get("vllm.entrypoints.launchers.app")
    if app_mod is None or getattr(app_mod.init_entrypoints_middleware, "_dmi", False):
        return
    original = app_mod.init_entrypoints_middleware

    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        spec, policy = served_config(getattr(args, "additional_config", None))
        if spec is not None:
            from dmi.errors import SpecError
            from dmi.serve.asgi import DmiMiddleware, Front

            count = getattr(args, "api_server_count", None)
            if count is not None and count > 1:
                # Each API server process would hold its own index of requests, tokens and
                # tenant quotas: a client's results read could land on a server that never
                # saw its request (404), and quotas would count per process.
                raise SpecError("api_server_count", f"dmi serves per-request capture from one API server "
                                                    f"process; got --api-server-count {count}. Run with "
                                                    f"--api-server-count 1 (one API server drives every "
                                                    f"engine core, data parallel included)")

            # Built now, so a bad policy stops the server at start-up, naming the field.
            front = Front.create("vllm", spec, policy, model=str(args.model),
                                 dtype=str(getattr(args, "dtype", "auto")),
                                 max_len=getattr(args, "max_model_len", None))
            # Added first, so vLLM's own middleware (API keys, CORS) runs outside it.
            app.add_middleware(DmiMiddleware, front=front)
        return original(args, app, *rest, **kwargs)

    init_entrypoints_middleware._dmi = True
    app_mod.init_entrypoints_middleware = init_entrypoints_middleware


def served_config(extra) -> tuple[dict | None, dict | None]:
    """(armed spec, serve policy) from --additional-config: {"dmi": spec, "dmi_serve": policy};
    the policy may also come from the DMI_SERVE environment variable."""
    import os

    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            return None, None
    if not isinstance(extra, dict) or extra.get("dmi") is None:
        return None, None
    spec = extra["dmi"]
    if isinstance(spec, str):
        spec = json.loads(spec)
    policy = extra.get("dmi_serve")
    if policy is None and os.environ.get("DMI_SERVE"):
        policy = json.loads(os.environ["DMI_SERVE"])
    return spec, policy


def _rpc(fn):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)
    return method


def _patch(cls, name: str, wrapper) -> None:
    original = getattr(cls, name)
    if getattr(original, "_dmi", False):
        return

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    patched._dmi = True
    setattr(cls, name, patched)


def armed_spec(vllm_config):
    extra = getattr(vllm_config, "additional_config", None)
    return extra.get("dmi") if isinstance(extra, dict) else None


def _after_load(original, worker, *args, **kwargs):
    result = original(worker, *args, **kwargs)
    spec = armed_spec(worker.vllm_config)
    if spec is not None:
        from . import worker as w

        w.open_session(worker, json.dumps(spec) if not isinstance(spec, str) else spec, served=True)
        _until_started(worker, w._SESSIONS[id(worker)])
        log.info("dmi: armed at construction; capturing into %s", spec.get("sink") if isinstance(spec, dict) else spec)
    return result


def _until_started(worker, session) -> None:
    """Mark the armed session as starting until the worker's last start-up stage returns
    (an instance attribute: CPU and GPU workers define the method on different classes)."""
    session.starting = True
    original = worker.compile_or_warm_up_model

    @functools.wraps(original)
    def warm_up(*args, **kwargs):
        result = original(*args, **kwargs)
        session.starting = False
        worker.__dict__.pop("compile_or_warm_up_model", None)
        return result

    worker.compile_or_warm_up_model = warm_up


def _before_shutdown(original, worker, *args, **kwargs):
    from . import worker as w

    try:
        w.close_session(worker)
    except Exception as e:  # noqa: BLE001  (shutting down: report and let vLLM finish)
        log.error("dmi: closing the armed session at shutdown failed: %s", e)
    return original(worker, *args, **kwargs)


def _armed(worker) -> bool:
    from . import worker as w

    return id(worker) in w._SESSIONS
