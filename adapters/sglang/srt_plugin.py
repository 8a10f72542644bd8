"""dmi's SGLang plugin (entry-point group `sglang.srt.plugins`), loaded by SGLang in every
process it starts. It installs, through SGLang's HookRegistry:

- ServerArgs.check_server_args (caller's process, before SGLang starts its processes): a spec
  armed through DMI_SPEC is validated where the user constructs the Engine or server;
- ModelRunner.load_model (scheduler): remembers the target model's runner;
- ModelRunner.init_cuda_graphs (scheduler): opens the DMI_SPEC session before graphs are
  captured, so capture points exist when the graphs record;
- ModelRunner.forward (scheduler): one dmi step per forward, rows from the ForwardBatch;
- Scheduler.on_idle (scheduler): flushes what was captured once the engine has nothing to
  run, so a server that is killed (SGLang's shutdown SIGKILLs the scheduler) leaves every
  finished request's rows committed in the file;
- Req.__init__ (scheduler): names each new request with a row id of its own
  (dmi/serve/names.py), so a rid sent again never merges two requests;
- http_server.launch_server (the server process, when DMI_SPEC arms it): adds dmi's front end
  (dmi/serve/asgi.py) to the server's app: per-request specs, `/v1/dmi/...`;
- Scheduler.dmi_control: the method the Engine's collective_rpc calls to open, steer and close
  the scheduler-side session (dmi.attach on a running Engine).

Every hook is a pass-through while no session is open.
"""
from __future__ import annotations

import logging

log = logging.getLogger("dmi")

_MR = "sglang.srt.model_executor.model_runner.ModelRunner"


def load() -> None:
    import multiprocessing
    import os

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from dmi.serve.engine import mark_front_end

    mark_front_end()
    HookRegistry.register("sglang.srt.managers.schedule_batch.Req.__init__", _after_req_init, HookType.AFTER)
    if multiprocessing.parent_process() is None and os.environ.get("DMI_SPEC"):
        HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", _before_launch_server,
                              HookType.BEFORE)

    # (not __post_init__: ServerArgs is a msgspec Struct, which calls the original directly)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", _validate_env_spec, HookType.AFTER)
    HookRegistry.register(f"{_MR}.load_model", _after_load_model, HookType.AFTER)
    HookRegistry.register(f"{_MR}.init_cuda_graphs", _around_init_cuda_graphs, HookType.AROUND)
    HookRegistry.register(f"{_MR}.forward", _around_forward, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.on_idle", _after_on_idle, HookType.AFTER)
    _add_rpc_method()


def _add_rpc_method() -> None:
    # collective_rpc calls getattr(scheduler, method); the registry wraps existing attributes
    # only, so the method is added to the class (once, in whichever process imports it).
    from sglang.srt.managers.scheduler import Scheduler

    from .control import RPC_METHOD, rpc

    if not hasattr(Scheduler, RPC_METHOD):
        setattr(Scheduler, RPC_METHOD, rpc)


def _after_req_init(result, self, *args, **kwargs):
    from . import control

    control.new_request(self)
    return result


def _before_launch_server(server_args, *args, **kwargs):
    """Adds dmi's middleware to SGLang's app before the server starts (a bad DMI_SERVE policy
    stops it here, naming the field)."""
    import json
    import os

    from sglang.srt.entrypoints import http_server

    from dmi.serve.asgi import DmiMiddleware, Front

    from . import control

    spec = json.loads(os.environ["DMI_SPEC"])
    # The schedulers, started after this and inheriting the environment, then know that they
    # serve: one that cannot arm stops the server rather than serve without capture or steering.
    os.environ[control.ENV_SERVED] = "1"
    front = Front.create("sglang", spec, os.environ.get("DMI_SERVE"), model=str(server_args.model_path),
                         max_len=getattr(server_args, "context_length", None))
    http_server.app.add_middleware(DmiMiddleware, front=front)
    return None


def _validate_env_spec(result, self, *args, **kwargs):
    from .frontend import validate_env_spec

    validate_env_spec(getattr(self, "model_path", None), int(getattr(self, "tp_size", 1) or 1))
    return result


def _after_load_model(result, self, *args, **kwargs):
    if not getattr(self, "is_draft_worker", False):
        from . import control

        control.register_runner(self)
    return result


def _around_init_cuda_graphs(original, self, *args, **kwargs):
    if not getattr(self, "is_draft_worker", False):
        from . import control

        control.register_runner(self)
        control.arm_from_env()
    return original(self, *args, **kwargs)


def _around_forward(original, self, forward_batch, *args, **kwargs):
    from . import control

    adapter = control.current_adapter()
    if adapter is None or adapter.runner is not self or adapter.session is None:
        return original(self, forward_batch, *args, **kwargs)
    if not adapter.begin(forward_batch):
        return original(self, forward_batch, *args, **kwargs)
    try:
        return original(self, forward_batch, *args, **kwargs)
    finally:
        adapter.end()


def _after_on_idle(result, self, *args, **kwargs):
    from . import control

    control.flush_if_idle(self)
    return result
