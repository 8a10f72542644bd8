"""Spec hook patterns -> this model's capture points. Pure config arithmetic, so the caller's
process (which has no model) validates exactly what the workers will bind."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dmi.adapter import Binding
from dmi.errors import SpecError
from dmi.tp import rank_sink  # noqa: F401  (re-exported: the vLLM adapter's callers name it here)
from dmi.hooknames import canonical_names, resolve, split_layer
from dmi.plan import LOGITS, TOKENS

from .tables import VllmTable, VTap, dense_layers, rank_dims, row_bytes, shard_of


@dataclass
class VBinding(Binding):
    tap: VTap | None = None
    path: str = ""
    factor: float | None = None  # the tap's scale on this model's config


class Hooks:
    """The capture points of one tensor-parallel rank (the only one without TP). Rank 0 binds
    every selected hook; the other ranks bind only the hooks split across ranks (their slice),
    since each rank holds the same whole rows of the others."""

    def __init__(self, table: VllmTable, hf_config, dtype: torch.dtype, tp_size: int = 1, tp_rank: int = 0):
        self.table = table
        self.full_dims = table.dims(hf_config)
        self.dims = rank_dims(self.full_dims, tp_size)
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.dtype = dtype
        self.hf_config = hf_config
        dense = dense_layers(hf_config, self.dims.n_layers)
        self.offered: dict[str, tuple[VTap, str]] = {}
        for name in canonical_names(self.full_dims.n_layers):
            layer, suffix = split_layer(name)
            tap = table.taps.get(suffix)
            if tap is None or (tap.dense_only and layer not in dense) or (tap.sparse_only and layer in dense):
                continue
            path = tap.module.replace("{L}", str(layer)) if layer is not None else tap.module
            self.offered[name] = (tap, path)

    def resolve(self, patterns: list[str]) -> list[str]:
        names = resolve(patterns, list(self.offered), self.full_dims.n_layers)
        modules = [n for n in names if n.startswith("module:")]
        if modules:
            raise SpecError("hooks", f"{modules[0]!r}: module hooks are not supported on vLLM (its modules fuse "
                                     f"what HF keeps apart); use canonical names such as "
                                     f"{', '.join(list(self.offered)[:3])}, ...")
        return names

    def bind(self, patterns: list[str]) -> list[VBinding]:
        out = []
        for name in self.resolve(patterns):
            tap, path = self.offered[name]
            shard = shard_of(tap, self.full_dims, self.tp_size, self.tp_rank)
            if self.tp_rank > 0 and shard is None:
                continue
            source = f"{path}.{tap.method}:return" if tap.method else f"{path}:{'input' if tap.pre else 'output'}"
            out.append(VBinding(name, source, row_bytes(tap, self.dims, self.dtype), shard=shard, tap=tap, path=path,
                                row_shape=tuple(tap.shape(self.dims)), dtype=tap.dtype or self.dtype,
                                group=LOGITS if name == "hook_logits" else TOKENS,
                                factor=float(tap.scale(self.hf_config)) if tap.scale is not None else None))
        return out
