"""Strict mode (DMI_STRICT=1, for tests): prove that no dmi Python runs where it must not.

A CPU test that passes through a Python callback proves nothing about CUDA-graph replay, where
no Python runs at all. So in strict mode a profiler on the engine's thread records every call
into dmi's own code that happens
- inside compiled code (dynamo's compiled call, inductor's generated code, a vLLM compiled
  graph): only the capture op's own CPU kernel may run there, which is what a GPU replaces by
  the recorded Triton kernel;
- inside a step of an eager forward, into the plan, the policies, the ring, the drain or a
  sink: per-hook host work the plan was made to remove.
Each violation is recorded once per function in the session's books (stats()["strict"]), so
a test, in this process or an engine's worker, asserts there are none.
"""
from __future__ import annotations

import os
import sys
import threading

ENV = "DMI_STRICT"

_ROOTS = tuple(os.path.dirname(os.path.abspath(m)) + os.sep for m in (
    __file__,                                                             # dmi/
    os.path.join(os.path.dirname(__file__), "..", "adapters", "x"),       # dmi.adapters
    os.path.join(os.path.dirname(__file__), "..", "kernels", "x"),        # dmi.kernels
    os.path.join(os.path.dirname(__file__), "..", "policies", "x"),       # dmi.policies
))
# the op's CPU kernel, and its fake impl (run while inductor compiles)
_OP_KERNEL = {("capture_op.py", "_capture_impl"), ("cpu.py", "capture_rows"), ("capture_op.py", "_capture_fake")}
_STEP_FORBIDDEN = tuple(os.path.join(r, "") for r in (
    os.path.join(_ROOTS[0], "plan"), os.path.join(_ROOTS[0], "drain"), os.path.join(_ROOTS[0], "sinks"),
    os.path.join(_ROOTS[0], "ring"), _ROOTS[3].rstrip(os.sep)))


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _compiled_marker(code) -> bool:
    """A frame running compiled code: dynamo's rewritten bytecode of a traced function (it calls
    its graph through a `__compiled_fn_*` global; resume functions after a graph break too),
    inductor's generated code, or vLLM's compiled-graph runners. Python that dynamo leaves
    untraced around the traced frame (nn.Module.__call__ and its hooks) is outside."""
    path = code.co_filename
    return (any(n.startswith("__compiled_fn") for n in code.co_names)
            or "torchinductor" in path or (os.sep + "_inductor" + os.sep) in path
            or ("vllm" + os.sep + "compilation" + os.sep) in path)


class Probe:
    def __init__(self, session):
        self.session = session
        self.violations: list[str] = []
        self._seen: set[tuple[str, str]] = set()
        self.thread = threading.get_ident()
        self._previous = sys.getprofile()

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        path = code.co_filename
        if not path.startswith(_ROOTS) or path == __file__:
            return
        where = (os.path.basename(path), code.co_name)
        if where in _OP_KERNEL:
            return
        f = frame.f_back
        while f is not None:
            if _compiled_marker(f.f_code):
                return self._record(path, code, "inside compiled code")
            f = f.f_back
        if self.session.frame is not None and path.startswith(_STEP_FORBIDDEN):
            self._record(path, code, "inside an eager step (per-hook host work)")

    def _record(self, path: str, code, why: str) -> None:
        key = (path, code.co_name)
        if key in self._seen:
            return
        self._seen.add(key)
        rel = path.split(os.sep + "main" + os.sep)[-1] if os.sep + "main" + os.sep in path else path
        self.violations.append(f"{rel}:{code.co_firstlineno} {code.co_name}() ran {why}")

    def install(self) -> "Probe":
        sys.setprofile(self)
        return self

    def uninstall(self) -> None:
        if threading.get_ident() == self.thread and sys.getprofile() is self:
            sys.setprofile(self._previous)
