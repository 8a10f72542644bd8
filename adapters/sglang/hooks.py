"""Which canonical hooks an SGLang model offers and where each is read; needs only the
model's HF config, so the caller's process validates a spec before any worker is touched."""
from __future__ import annotations

import math
from dataclasses import dataclass

from dmi.adapter import Binding
from dmi.errors import UnknownHookError
from dmi.hooknames import canonical_names, resolve, split_layer
from dmi.plan import LOGITS, TOKENS
from dmi.tp import rank_dims, shard

from .tables.base import Dims, SGLangTable, STap, Where

_DTYPE_SIZE = {"int64": 8, "int32": 4}


@dataclass
class SBinding(Binding):
    tap: STap | None = None
    where: Where | None = None
    factor: float | None = None  # the tap's scale on this model's config


class HookMap:
    """The hooks of one tensor-parallel rank (the only one without TP). Rank 0 binds every selected
    hook, its slice of the split ones (attention heads, MLP features); the other ranks bind only
    their slices of those, since every rank holds the same whole rows."""

    def __init__(self, table: SGLangTable, hf_config, dtype_size: int = 4, dtype=None, tp_size: int = 1,
                 tp_rank: int = 0, model=None):
        self.table = table
        self.cfg = hf_config
        self.full_dims: Dims = table.dims(hf_config)
        self.dims: Dims = rank_dims(self.full_dims, tp_size)  # what this rank's tensors hold
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.dtype_size = dtype_size
        self.dtype = dtype  # the model's torch dtype, known next to the model (row layouts for the plan)
        self.model = model  # next to the model only: which outputs are partial sums under TP

    def offered(self) -> dict[str, tuple[STap, Where]]:
        out = {}
        for name in canonical_names(self.full_dims.n_layers):
            layer, suffix = split_layer(name)
            tap = self.table.taps.get(suffix)
            if tap is None or (layer is not None and not self.table.has(self.cfg, layer, suffix)):
                continue
            out[name] = (tap, tap.where(layer, self.full_dims))
        return out

    def resolve(self, patterns: list[str]) -> list[str]:
        names = resolve(patterns, list(self.offered()), self.full_dims.n_layers)
        modules = [n for n in names if n.startswith("module:")]
        if modules:
            raise UnknownHookError("hooks", f"{modules[0]!r}: 'module:' hooks are not offered on SGLang; use the "
                                            f"canonical names ({', '.join(list(self.offered())[:4])}, ...) or a "
                                            f"preset (resid, attn, mlp, all)")
        return names

    def _split(self, tap: STap, where: Where) -> str | None:
        """How rank rows of `tap` relate: its table's split, or, for a module whose row-parallel
        projection leaves the all-reduce to the layer (SGLang fuses it into the next residual add),
        "partial": every rank holds a partial sum. Known only next to the model; the caller validates
        with rank 0's binding, the same either way."""
        if tap.shard != "unreduced":
            return tap.shard
        if self.model is None or self.tp_size == 1:
            return None
        mod = self.model.get_submodule(where.module)
        unreduced = any(getattr(c, "reduce_results", True) is False for c in mod.children())
        return "partial" if unreduced else None

    def bind(self, patterns: list[str]) -> list[SBinding]:
        offered = self.offered()
        out = []
        for name in self.resolve(patterns):
            tap, where = offered[name]
            piece = shard(self._split(tap, where), self.full_dims, self.tp_size, self.tp_rank)
            if self.tp_rank > 0 and piece is None:
                continue
            size = _DTYPE_SIZE.get(tap.dtype or "", self.dtype_size)
            idx = "" if where.index is None else f"[{where.index}]"
            # Router ids come as int32 or int64 depending on the top-k kernel SGLang picks: their
            # layout is read off the tensor (the eager-only path), every other row is planned.
            dtype = None if tap.dtype else self.dtype
            out.append(SBinding(name, f"{where.module}:{where.io}{idx}", math.prod(tap.shape(self.dims)) * size,
                                row_shape=tuple(tap.shape(self.dims)) if dtype is not None else None, dtype=dtype,
                                group=LOGITS if tap.view == "last_rows" else TOKENS, shard=piece,
                                tap=tap, where=where,
                                factor=float(tap.scale(self.cfg)) if tap.scale is not None else None))
        return out
