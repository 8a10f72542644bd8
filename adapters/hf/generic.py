"""Any torch.nn.Module: `module:` hooks and dmi.HookPoints, with the HF adapter's capture mechanics.

One top-level forward is one step and each batch row a new request, as for a bare HF forward;
the forward's first argument (or `input_ids` / `inputs_embeds`) is [batch, tokens, ...] and
places the rows. There are no layers and no derived taps: a HookPoint named with a canonical
name (`blocks.0.hook_resid_post`) is offered under it, so globs and presets select it.
"""
from __future__ import annotations

import torch

from dmi.dims import Dims
from dmi.errors import UnknownHookError
from dmi.hookpoint import HookPoint
from dmi.hooknames import HOOK_TYPE_BY_SUFFIX, canonical_names, split_layer

from .adapter import HFAdapter
from .derive import Derived
from .tables.base import Tap


class ModuleAdapter(HFAdapter):
    engine_name = "module"

    def __init__(self, module: torch.nn.Module):
        names = [m.name or p for p, m in module.named_modules() if isinstance(m, HookPoint)]
        layers = [split_layer(n)[0] for n in names]
        n_layers = max([x for x in layers if x is not None], default=-1) + 1
        super().__init__(module, derived=Derived("", Dims(n_layers, 0, 0, 0, 0, 0, 0), {}))

    def describe(self) -> tuple[str, dict]:
        return type(self.model).__name__, {}

    def _eager(self) -> bool:
        return True

    def offered(self) -> dict[str, tuple[Tap, str]]:
        """HookPoints that carry a canonical name, under that name, in forward order."""
        marked = {}
        for p, m in self.model.named_modules():
            if isinstance(m, HookPoint) and m.name and split_layer(m.name)[1] in HOOK_TYPE_BY_SUFFIX:
                marked.setdefault(m.name, p)  # a second one is refused by _hookpoints
        order = canonical_names(self.dims.n_layers)
        return {n: (Tap(marked[n], shape=lambda d: (0,)), marked[n]) for n in order if n in marked}

    def found(self) -> dict[str, tuple[Tap, str, str]]:
        return {n: (t, p, "HookPoint") for n, (t, p) in self.offered().items()}

    def _hookpoints(self, offered: dict | None = None) -> dict[str, str]:
        every = super()._hookpoints(None)  # refuses duplicate names
        return {n: p for n, p in every.items() if not offered or n not in offered}

    def _resolve(self, patterns: list[str], offered: dict, hookpoints: dict) -> list[str]:
        try:
            return super()._resolve(patterns, offered, hookpoints)
        except UnknownHookError as e:
            marks = ", ".join([*offered, *hookpoints]) or "none"
            raise UnknownHookError("hooks", f"{str(e).removeprefix('hooks: ')}. A {type(self.model).__name__} is not "
                                            f"an engine dmi knows: it offers its dmi.HookPoints ({marks}) and "
                                            f"'module:<dotted.path>[:input]' hooks") from None
