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
from dmi.tp import rank_sink

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


def tp_size_of(engine) -> int:
    return int(getattr(engine.server_args, "tp_size", 1) or 1)


def hook_map(model_path: str, tables=None, tp_size: int = 1) -> HookMap:
    """Rank 0's hooks (every hook, its slice of the split ones): what the caller validates."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    arch = (getattr(cfg, "architectures", None) or ["?"])[0]
    for t in tables or BUILTIN_TABLES:
        if arch in t.architectures:
            return HookMap(t, cfg, tp_size=tp_size)
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
    if hmap.tp_size > 1:
        rank_sink(spec.sink, 1, hmap.tp_size)  # every rank past 0 names its file the same way
    return spec


def validate_env_spec(model_path: str | None, tp_size: int = 1) -> None:
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

    spec = validate(spec, hook_map(model_path, plugins.arch_tables("sglang"), tp_size))
    import multiprocessing

    if multiprocessing.parent_process() is None:
        # The sink too, here and not only in the scheduler: an existing run there (never
        # overwritten unasked) or an unwritable path stops the engine before it starts, with
        # the error where the user constructed it (a scheduler's failure reaches only the log).
        plugins.sink_for(spec.sink)
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
        for name in ("pp_size", "dp_size"):
            n = getattr(args, name, 1) or 1
            if n != 1:
                # Pipeline stages hold different layers, data-parallel schedulers different requests;
                # dmi.open merges only tensor-parallel slices, so refuse rather than mislead.
                raise EngineNotSupportedError(f"dmi's SGLang adapter captures tensor-parallel engines (any tp_size) "
                                              f"but not pipeline or data parallel ones; this engine has {name}={n}. "
                                              f"Use {name}=1")
        if getattr(args, "enable_dp_attention", False):
            raise EngineNotSupportedError("dmi's SGLang adapter does not attribute rows under data-parallel attention "
                                          "(enable_dp_attention); start the engine without it")
        self.tp_size = tp_size_of(engine)
        if getattr(args, "speculative_algorithm", None):
            raise EngineNotSupportedError("dmi's SGLang adapter does not attribute speculative decoding's verify "
                                          "steps; start the engine without speculative_algorithm")
        self.map = hook_map(self.model_path, tables, self.tp_size)

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
        try:
            rpc_ranks(self.engine, "open", spec=spec.to_json(), family=self.map.table.family)
        except BaseException:
            # A rank that failed leaves the others open: close them, so no rank captures alone.
            try:
                rpc_ranks(self.engine, "close")
            except Exception:  # noqa: BLE001  (the open's error is the one to report)
                pass
            raise
        return SGLangSession(self.engine, self, spec)


class SGLangSession(RemoteSession):
    """One scheduler per tensor-parallel rank; stats and close answer per rank."""

    def _rpc_stats(self) -> list[dict]:
        return [r["stats"] for r in rpc_ranks(self.engine, "stats")]

    def _rpc_flush(self, timeout: float | None) -> None:
        rpc_ranks(self.engine, "flush", timeout=-1.0 if timeout is None else float(timeout))

    def _rpc_close(self) -> list[dict]:
        return [r["stats"] for r in rpc_ranks(self.engine, "close")]


class RemoteError(DmiError):
    pass


def rpc(engine, op: str, spec: str = "", timeout: float = -1.0) -> dict:
    """Rank 0's answer (every rank ran the op; a failure on any raises)."""
    return rpc_ranks(engine, op, spec, timeout)[0]


def rpc_ranks(engine, op: str, spec: str = "", timeout: float = -1.0, **extra) -> list[dict]:
    """Every tensor-parallel rank's answer, in rank order: collective_rpc runs the op on each
    rank's scheduler, and rank r writes its answer beside rank 0's (control.reply_path)."""
    fd, reply = tempfile.mkstemp(prefix="dmi-sglang-", suffix=".json")
    os.close(fd)
    os.unlink(reply)
    paths = [control.reply_path(reply, r) for r in range(tp_size_of(engine))]
    answers = []
    try:
        try:
            engine.collective_rpc(control.RPC_METHOD, op=op, reply=reply, spec=spec, timeout=timeout, **extra)
        except AssertionError as e:  # collective_rpc asserts on the scheduler's failure
            raise RemoteError(f"dmi: the SGLang scheduler failed {op!r}: {e}. Is the dmi plugin installed in the "
                              f"engine's environment (entry point sglang.srt.plugins)?") from None
        for rank, path in enumerate(paths):
            if not os.path.exists(path):
                raise RemoteError(f"dmi: the SGLang scheduler of tensor-parallel rank {rank} did not answer {op!r}; "
                                  f"is the dmi plugin loaded there?")
            with open(path) as f:
                answers.append(json.load(f))
    finally:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)
    return [_result(op, a, rank) for rank, a in enumerate(answers)]


def _result(op: str, answer: dict, rank: int) -> dict:
    if not answer["ok"]:
        err = answer["error"]
        cls = {"CudaGraphAttachError": control.CudaGraphAttachError,
               "SessionStateError": SessionStateError}.get(err["type"])
        if cls is not None:
            raise cls(err["message"])
        if err["value_error"]:
            raise ValueError(err["message"])
        where = f" (tensor-parallel rank {rank})" if rank else ""
        raise RemoteError(f"dmi: the SGLang scheduler{where} failed {op!r}: {err['type']}: {err['message']}")
    return answer["result"]
