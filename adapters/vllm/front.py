"""Caller side: `dmi.attach(llm, spec)` on a `vllm.LLM`.

The model lives in the workers (in this process with VLLM_ENABLE_V1_MULTIPROCESSING=0,
else in other processes); this side resolves and validates the spec from the engine's
config, so bad input fails here before any worker is touched, then drives the worker
sessions by name through `llm.collective_rpc`.
"""
from __future__ import annotations

import json

from dmi.errors import EngineNotSupportedError, RingTooSmallError, SpecError
from dmi.remote import RemoteAdapter, RemoteSession
from dmi.ring import PayloadRing
from dmi.spec import CaptureSpec

from .binding import Hooks, rank_sink
from .tables import VllmTable
from .vllm_plugin import armed_spec


def compiled(vllm_config) -> bool:
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode != CompilationMode.NONE


class VllmAdapter(RemoteAdapter):
    engine_name = "vllm"
    supports_interventions = True

    def __init__(self, llm, table: VllmTable):
        super().__init__(llm)
        self.llm = llm
        self.vllm_config = llm.llm_engine.vllm_config
        mc = self.vllm_config.model_config
        # Rank 0 binds every hook (its slice of the split ones): the caller validates against it.
        self.hooks = Hooks(table, mc.hf_config, mc.dtype, self.vllm_config.parallel_config.tensor_parallel_size)

    @property
    def device(self):
        import torch

        return torch.device(self.vllm_config.device_config.device_type)

    def describe(self):
        mc = self.vllm_config.model_config
        return str(mc.model), mc.hf_config.to_dict()

    def resolve(self, patterns):
        return self.hooks.resolve(patterns)

    def bind(self, patterns):
        return self.hooks.bind(patterns)

    def editable(self, b) -> str | None:
        from .edits import not_editable

        return not_editable(b.tap, self.vllm_config.parallel_config.tensor_parallel_size)

    def open_session(self, spec: CaptureSpec, progress: bool = False) -> VllmSession:
        armed = armed_spec(self.vllm_config)
        if armed is not None:
            armed = CaptureSpec.parse(armed)
            if spec != CaptureSpec() and spec != armed:
                raise SpecError("spec", "this engine was armed at construction (additional_config={'dmi': ...}) "
                                        "and captures that spec; call dmi.attach(llm) without a spec to reach it")
            return VllmSession(self.llm, self, armed, armed=True)
        if compiled(self.vllm_config):
            raise EngineNotSupportedError(
                "dmi cannot add capture points to a vLLM engine that is already compiled (torch.compile "
                "bakes the model's code in; hooks added now would never run). Either build it with "
                "LLM(..., additional_config={'dmi': spec_dict}) (or `vllm serve --additional-config "
                "'{\"dmi\": ...}'`) and call dmi.attach(llm), or build it with enforce_eager=True")
        self._validate(spec)
        return VllmSession(self.llm, self, spec, armed=False)

    def _validate(self, spec: CaptureSpec) -> None:
        """Everything the workers would refuse, refused here first."""
        from dmi import plugins

        bindings = self.bind(spec.hooks)
        need = sum(PayloadRing.aligned(b.row_bytes) for b in bindings)
        if need > spec.ring.bytes:
            raise RingTooSmallError("ring.bytes", f"{spec.ring.bytes} bytes cannot hold one token row of the selected "
                                                  f"hooks ({need} bytes); raise ring.bytes to at least {need}")
        if spec.requests.predicate is not None:
            from dmi.session import _predicate

            _predicate(spec.requests.predicate)
        if spec.interventions:  # hooks, values, files and stored runs, checked as the workers will
            from dmi.interventions.edits import Edits
            from dmi.session import _predicate

            Edits(spec, self, [b.name for b in bindings], _predicate, lambda k, m: None, device="cpu")
        plugins.sink_for(spec.sink)  # a sink creates nothing before open()
        tp = self.vllm_config.parallel_config.tensor_parallel_size
        if tp > 1:
            rank_sink(spec.sink, 1, tp)  # every rank past 0 names its file the same way


class VllmSession(RemoteSession):
    def __init__(self, llm, adapter: VllmAdapter, spec: CaptureSpec, armed: bool):
        super().__init__(llm, adapter, spec)
        self.armed = armed
        try:
            if armed:
                if not all(self._call("dmi_armed")):
                    raise RuntimeError("dmi: the engine's config names a dmi spec but its workers hold no session "
                                       "(closed already, or the vllm.general_plugins entry point of dmi is missing)")
                self.hooks = self.adapter.resolve(spec.hooks)
            else:
                opened = [json.loads(r) for r in self._call("dmi_open", spec.to_json(), adapter.hooks.table.family)]
                self.hooks = opened[0]["hooks"]
        except BaseException:
            from dmi.session import _ARMED

            self.closed = True
            _ARMED.pop(id(llm), None)
            raise

    def _engine_dead(self, error: BaseException) -> bool:
        return type(error).__name__ == "EngineDeadError"

    def _call(self, method: str, *args):
        return self.engine.collective_rpc(method, args=args)

    def _rpc_stats(self) -> list[dict]:
        return [json.loads(r) for r in self._call("dmi_stats")]

    def _rpc_flush(self, timeout):
        self._call("dmi_flush", timeout)

    def _rpc_close(self) -> list[dict]:
        return [json.loads(r) for r in self._call("dmi_close")]
