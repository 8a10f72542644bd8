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
    adapter = plugins.adapter_for(engine)
    if getattr(adapter, "remote", False):  # the model runs in other processes: capture there
        return adapter.open_session(spec, progress=progress)
    sink = plugins.sink_for(spec.sink)
    return Session(engine, adapter, spec, sink, progress=progress)


def open(path, merge_ranks: bool = True, storage_options: dict | None = None):  # noqa: A001  (dmi.open is the public name)
    """Read a capture file: requests, hooks, get(hook, request), positions(hook, request), stats,
    stack(hook), run[hook]. A tensor-parallel run's rank files are merged into one unless
    merge_ranks=False. A dataset (folder, s3://... URL or manifest) reads as one run across its
    shards and writers; storage_options go to fsspec (endpoint, credentials)."""
    from dmi.reader import open_run

    return open_run(path, merge_ranks=merge_ranks, storage_options=storage_options)


__all__ = ["attach", "open", "CaptureSpec", "HookPoint", "DmiError", "SpecError", "UnknownHookError", "__version__"]
