"""The hooks a served engine captures, as the front end sees them: the armed spec's hooks
(narrowed by the policy's `hooks`), with each one's row size for byte budgets. Computed from
the model's config in the front end's process, which has no model."""
from __future__ import annotations

from dmi.errors import SpecError
from dmi.hooknames import resolve


class Served:
    def __init__(self, names: list[str], row_bytes: dict[str, int], n_layers: int, allowed: list[str] | None = None):
        self.names = names                  # the armed spec's hooks, in forward order
        self.row_bytes = row_bytes
        self.n_layers = n_layers
        self.allowed = names if allowed is None else allowed

    def narrow(self, patterns: list[str] | None) -> "Served":
        """The policy's hooks: a subset of the armed spec's."""
        if patterns is None:
            return self
        try:
            allowed = resolve(patterns, self.names, self.n_layers)
        except SpecError as e:
            raise SpecError("dmi_serve.hooks", f"{str(e).split(': ', 1)[-1]} (the policy's hooks must be among "
                                               f"the armed spec's)") from None
        return Served(self.names, self.row_bytes, self.n_layers, allowed)

    def resolve(self, patterns: list[str]) -> list[str]:
        return resolve(patterns, self.allowed, self.n_layers)

    def bytes_of(self, hooks: list[str]) -> int:
        return sum(self.row_bytes[h] for h in hooks)


def for_vllm(model: str, dtype: str, spec: dict) -> Served:
    import torch
    from transformers import AutoConfig

    from dmi.adapters.vllm.binding import Hooks
    from dmi.adapters.vllm.tables import table_for
    from dmi.spec import CaptureSpec

    cfg = AutoConfig.from_pretrained(model)
    table = table_for(cfg.model_type)
    if table is None:
        raise SpecError("model", f"dmi has no vLLM table for model_type {cfg.model_type!r}")
    tdtype = getattr(torch, dtype, None) if dtype not in ("auto", "None") else None
    if not isinstance(tdtype, torch.dtype):
        tdtype = getattr(cfg, "torch_dtype", None) or getattr(cfg, "dtype", None) or torch.float32
        if isinstance(tdtype, str):
            tdtype = getattr(torch, tdtype, torch.float32)
    bindings = Hooks(table, cfg, tdtype).bind(CaptureSpec.parse(spec).hooks)
    return Served([b.name for b in bindings], {b.name: b.row_bytes for b in bindings}, table.dims(cfg).n_layers)


def for_sglang(model_path: str, spec: dict) -> Served:
    from dmi.adapters.sglang.frontend import hook_map
    from dmi.spec import CaptureSpec

    hm = hook_map(model_path)
    bindings = hm.bind(CaptureSpec.parse(spec).hooks)
    return Served([b.name for b in bindings], {b.name: b.row_bytes for b in bindings}, hm.dims.n_layers)
