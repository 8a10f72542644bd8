"""dmi: deep model inspection for LLM inference.

    with dmi.attach(model, dmi.CaptureSpec(hooks=["resid"], sink="out.h5")):
        model.generate(...)
    run = dmi.open("out.h5")
"""
__version__ = "0.1.0"

from dmi.errors import DmiError, SpecError, UnknownHookError  # noqa: E402
from dmi.hookpoint import HookPoint  # noqa: E402
from dmi.spec import CaptureSpec  # noqa: E402


def attach(engine, spec=None, *, progress: bool = False):
    """Arm `engine` with the capture points `spec` names; returns a Session (a context manager),
    or a dmi.remote.RemoteSession for an engine whose model runs in worker processes.

    Bad input raises a ValueError subclass naming the field, before the engine is touched.
    """
    from dmi import plugins
    from dmi.session import Session

    spec = CaptureSpec.parse(spec)
    wrapper = None
    if _is_compiled_module(engine):  # torch.compile(model): capture the model, bracket the wrapper's calls
        wrapper, engine = engine, engine._orig_mod
    adapter = plugins.adapter_for(engine)
    if wrapper is not None:
        if not hasattr(adapter, "wrappers"):
            from dmi.errors import EngineNotSupportedError

            raise EngineNotSupportedError(f"dmi's {adapter.engine_name} adapter cannot capture through a "
                                          f"torch.compile wrapper; attach the module itself and compile after")
        adapter.wrappers.append(wrapper)
    if spec.interventions and not getattr(adapter, "supports_interventions", False):
        raise SpecError("interventions", f"the {adapter.engine_name} adapter cannot apply interventions yet "
                                         f"(supported: hf, vllm, sglang); remove them")
    if getattr(adapter, "remote", False):  # the model runs in other processes: capture there
        return adapter.open_session(spec, progress=progress)
    from dmi.memory import check_ring_fits

    check_ring_fits(spec.ring.bytes, adapter.device)
    sink = plugins.sink_for(spec.sink)
    return Session(engine, adapter, spec, sink, progress=progress)


def _is_compiled_module(engine) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        return False
    return isinstance(engine, OptimizedModule)


def open(path, merge_ranks: bool = True, salvage: bool = False,  # noqa: A001  (dmi.open is the public name)
         storage_options: dict | None = None):
    """Read a capture file: requests, hooks, get(hook, request), positions(hook, request), stats,
    stack(hook), run[hook]. A tensor-parallel run's rank files are merged into one unless
    merge_ranks=False. salvage=True reads what survives of a file that was cut short (a copy or
    disk that stopped). A dataset (folder, s3://... URL or manifest) reads as one run across its
    shards and writers; storage_options go to fsspec (endpoint, credentials)."""
    from dmi.reader import open_run

    return open_run(path, merge_ranks=merge_ranks, salvage=salvage, storage_options=storage_options)


__all__ = ["attach", "open", "CaptureSpec", "HookPoint", "DmiError", "SpecError", "UnknownHookError", "__version__"]
