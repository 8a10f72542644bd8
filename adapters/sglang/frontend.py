"""The caller's side of an SGLang Engine: validate the spec here, capture in the scheduler.

`dmi.attach(engine, spec)` resolves the spec against the model's config in this process (bad
input fails before the engine is touched), then opens the scheduler's session through the
Engine's collective_rpc. An engine armed at construction (DMI_SPEC) already has its session:
`dmi.attach(engine)` binds to it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dmi.errors import (
    DmiError,
    EngineNotSupportedError,
    RingTooSmallError,
    SessionStateError,
    SpecError,
)
from dmi.remote import RemoteAdapter, RemoteSession
from dmi.ring import PayloadRing
from dmi.spec import CaptureSpec

from . import control
from .hooks import HookMap
from .tables import BUILTIN_TABLES

SUPPORTED_VERSIONS = ("0.5.23",)


def check_version() -> str:
    import sglang

    v = getattr(sglang, "__version__", "?")
    if v not in SUPPORTED_VERSIONS:
        raise EngineNotSupportedError(f"dmi's SGLang adapter supports sglang {', '.join(SUPPORTED_VERSIONS)}; "
                                      f"this is sglang {v}. Install sglang=={SUPPORTED_VERSIONS[-1]}")
    return v


def hook_map(model_path: str, tables=None) -> HookMap:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    arch = (getattr(cfg, "architectures", None) or ["?"])[0]
    for t in tables or BUILTIN_TABLES:
        if arch in t.architectures:
            return HookMap(t, cfg)
    known = sorted(a for t in (tables or BUILTIN_TABLES) for a in t.architectures)
    raise EngineNotSupportedError(f"dmi has no SGLang architecture table for {arch!r}; known: {', '.join(known)}")


def absolute_sink(spec: CaptureSpec) -> CaptureSpec:
    """The scheduler writes the file; a relative path means the caller's directory."""
    sink = spec.sink
    if isinstance(sink, str):
        sink = str(Path(sink).expanduser().absolute())
    elif isinstance(sink, dict) and isinstance(sink.get("path"), str):
        sink = {**sink, "path": str(Path(sink["path"]).expanduser().absolute())}
    return spec.model_copy(update={"sink": sink})


def validate(spec: CaptureSpec, hmap: HookMap) -> CaptureSpec:
    from dmi import plugins

    bindings = hmap.bind(spec.hooks)
    need = sum(PayloadRing.aligned(b.row_bytes) for b in bindings)
    if need > spec.ring.bytes:  # the scheduler's Session checks this too; here it fails before the RPC
        raise RingTooSmallError(
            "ring.bytes", f"{spec.ring.bytes} bytes cannot hold one token row of the selected hooks ({need} bytes "
            f"for {len(bindings)} hooks); raise ring.bytes to at least {need}, or select fewer hooks")
    if spec.degrade is not None:
        hmap.resolve(spec.degrade.fallback.hooks)
    if spec.interventions:  # hooks, values, files and stored runs, checked as the scheduler will
        from dmi.interventions.edits import Edits
        from dmi.session import _predicate

        from .edits import check

        check(Edits(spec, _Validating(hmap), [b.name for b in bindings], _predicate, lambda k, m: None,
                    device="cpu"))
    spec = absolute_sink(spec)
    plugins.sink_for(spec.sink)  # a bad path fails here; nothing is created before open()
    return spec


def validate_env_spec(model_path: str | None) -> None:
    """DMI_SPEC, checked where the engine is constructed; rewritten with an absolute sink path
    so the scheduler (which inherits the environment) writes where the user meant."""
    raw = os.environ.get(control.ENV_SPEC)
    if not raw or not model_path:
        return
    try:
        spec = CaptureSpec.parse(raw)
    except SpecError as e:
        raise SpecError(e.field, f"in the environment variable {control.ENV_SPEC}: {e}") from None
    from dmi import plugins

    spec = validate(spec, hook_map(model_path, plugins.arch_tables("sglang")))
    os.environ[control.ENV_SPEC] = spec.to_json()


class _Validating:
    """What dmi.interventions needs of an adapter to check a spec, from the hook map alone."""

    engine_name = "sglang"
    supports_interventions = True

    def __init__(self, hmap: HookMap):
        import torch

        # the caller's map knows no dtype (row layouts are fixed next to the model): the config's
        dtype = hmap.dtype or getattr(torch, str(getattr(hmap.cfg, "torch_dtype", None) or "float32")
                                      .removeprefix("torch."), torch.float32)
        self.bind = HookMap(hmap.table, hmap.cfg, hmap.dtype_size, dtype=dtype).bind

    @staticmethod
    def editable(b) -> str | None:
        from .edits import site

        where = site(b)
        return where if isinstance(where, str) else None


class SGLangAdapter(RemoteAdapter):
    engine_name = "sglang"
    supports_interventions = True

    def __init__(self, engine, tables=None):
        super().__init__(engine)
        check_version()
        args = engine.server_args
        self.model_path = args.model_path
        for name in ("tp_size", "pp_size", "dp_size"):
            n = getattr(args, name, 1) or 1
            if n != 1:
                raise EngineNotSupportedError(f"dmi's SGLang adapter captures in one scheduler process; this engine "
                                              f"has {name}={n}. Use {name}=1")
        if getattr(args, "speculative_algorithm", None):
            raise EngineNotSupportedError("dmi's SGLang adapter does not attribute speculative decoding's verify "
                                          "steps; start the engine without speculative_algorithm")
        self.map = hook_map(self.model_path, tables)

    def describe(self):
        return self.model_path, self.map.cfg.to_dict()

    def resolve(self, patterns):
        return self.map.resolve(patterns)

    def bind(self, patterns):
        return self.map.bind(patterns)

    def open_session(self, spec, progress: bool = False) -> SGLangSession:
        bare = spec == CaptureSpec()  # dmi.attach(engine) with no spec: the armed session, if any
        if not bare:
            spec = validate(spec, self.map)  # bad input fails before the engine is asked anything
        status = rpc(self.engine, "status")
        if status["open"]:
            armed = CaptureSpec.parse(status["spec"])
            if bare or spec == armed:
                return SGLangSession(self.engine, self, armed)
            why = ("it was armed at construction (DMI_SPEC)" if status["armed_at_start"]
                   else "another dmi session is open on it")
            raise SessionStateError(f"this SGLang engine already captures with a spec: {why}. Attach with no spec "
                                    f"(dmi.attach(engine)) to use that session, or close it first")
        if bare and status.get("arm_error"):
            raise SessionStateError(f"arming this SGLang engine at construction (DMI_SPEC) failed in its scheduler: "
                                    f"{status['arm_error']}")
        if bare:
            spec = validate(spec, self.map)
        rpc(self.engine, "open", spec=spec.to_json())
        return SGLangSession(self.engine, self, spec)


class SGLangSession(RemoteSession):
    def _rpc_stats(self) -> list[dict]:
        return [rpc(self.engine, "stats")["stats"]]

    def _rpc_flush(self, timeout: float | None) -> None:
        rpc(self.engine, "flush", timeout=-1.0 if timeout is None else float(timeout))

    def _rpc_close(self) -> list[dict]:
        return [rpc(self.engine, "close")["stats"]]


class RemoteError(DmiError):
    pass


def rpc(engine, op: str, spec: str = "", timeout: float = -1.0) -> dict:
    fd, reply = tempfile.mkstemp(prefix="dmi-sglang-", suffix=".json")
    os.close(fd)
    os.unlink(reply)
    try:
        try:
            engine.collective_rpc(control.RPC_METHOD, op=op, reply=reply, spec=spec, timeout=timeout)
        except AssertionError as e:  # collective_rpc asserts on the scheduler's failure
            raise RemoteError(f"dmi: the SGLang scheduler failed {op!r}: {e}. Is the dmi plugin installed in the "
                              f"engine's environment (entry point sglang.srt.plugins)?") from None
        if not os.path.exists(reply):
            raise RemoteError(f"dmi: the SGLang scheduler did not answer {op!r}; is the dmi plugin loaded there?")
        with open(reply) as f:
            answer = json.load(f)
    finally:
        if os.path.exists(reply):
            os.unlink(reply)
    if not answer["ok"]:
        err = answer["error"]
        cls = {"CudaGraphAttachError": control.CudaGraphAttachError,
               "SessionStateError": SessionStateError}.get(err["type"])
        if cls is not None:
            raise cls(err["message"])
        if err["value_error"]:
            raise ValueError(err["message"])
        raise RemoteError(f"dmi: the SGLang scheduler failed {op!r}: {err['type']}: {err['message']}")
    return answer["result"]
