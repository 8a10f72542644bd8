"""The hooks a served engine captures, as the front end sees them: the armed spec's hooks
(narrowed by the policy's `hooks`), with each one's row size for byte budgets. Computed from
the model's config in the front end's process, which has no model."""
from __future__ import annotations

from dmi.errors import SpecError
from dmi.hooknames import resolve


class Served:
    def __init__(self, names: list[str], row_bytes: dict[str, int], n_layers: int, allowed: list[str] | None = None,
                 shapes: dict[str, tuple] | None = None, not_editable: dict[str, str | None] | None = None):
        self.names = names                  # the armed spec's hooks, in forward order
        self.row_bytes = row_bytes
        self.n_layers = n_layers
        self.allowed = names if allowed is None else allowed
        self.shapes = shapes or {}          # hook -> row shape (None: known only at run time)
        self.not_editable = not_editable or {}  # hook -> why an intervention cannot edit it
        self.steerable: list[str] = []      # the policy's intervention hooks (banks on the engine)

    def steer(self, names: list[str]) -> "Served":
        """The hooks clients may steer (ServePolicy.bank_hooks); each must be editable."""
        for n in names:
            why = self.not_editable.get(n) if n in self.shapes else "its row layout is known only at run time"
            if why:
                raise SpecError("dmi_serve.intervention_hooks", f"{n} cannot be edited: {why}")
        self.steerable = names
        return self

    def narrow(self, patterns: list[str] | None) -> "Served":
        """The policy's hooks: a subset of the armed spec's."""
        if patterns is None:
            return self
        try:
            allowed = resolve(patterns, self.names, self.n_layers)
        except SpecError as e:
            raise SpecError("dmi_serve.hooks", f"{str(e).split(': ', 1)[-1]} (the policy's hooks must be among "
                                               f"the armed spec's)") from None
        return Served(self.names, self.row_bytes, self.n_layers, allowed, self.shapes, self.not_editable)

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
    from dmi.adapters.vllm.edits import not_editable

    bindings = Hooks(table, cfg, tdtype).bind(CaptureSpec.parse(spec).hooks)
    return Served([b.name for b in bindings], {b.name: b.row_bytes for b in bindings}, table.dims(cfg).n_layers,
                  shapes=_shapes(bindings),
                  not_editable={b.name: _why(b) or not_editable(b.tap, 1) for b in bindings})


def for_sglang(model_path: str, spec: dict) -> Served:
    from dmi.adapters.sglang.frontend import hook_map
    from dmi.spec import CaptureSpec

    from dmi.adapters.sglang.edits import site

    hm = hook_map(model_path)
    bindings = hm.bind(CaptureSpec.parse(spec).hooks)
    # (no model dtype here, so the bindings carry no row_shape: the taps give it)
    return Served([b.name for b in bindings], {b.name: b.row_bytes for b in bindings}, hm.dims.n_layers,
                  shapes={b.name: tuple(b.tap.shape(hm.dims)) for b in bindings if not b.tap.dtype},
                  not_editable={b.name: _why(b) or (lambda w: w if isinstance(w, str) else None)(site(b))
                                for b in bindings})


def _shapes(bindings) -> dict[str, tuple]:
    return {b.name: tuple(b.row_shape) for b in bindings if getattr(b, "row_shape", None) is not None}


def _why(b) -> str | None:
    from dmi.plan.rows import TOKENS

    if getattr(b, "group", TOKENS) != TOKENS:
        return "its rows are not the step's token rows (logits are computed per request)"
    return None
