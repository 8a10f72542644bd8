"""The HF transformers adapter: the only code that touches an HF model's internals.

Capture points are forward hooks on the modules an architecture table names; each calls
the session, which copies through the `dmi::capture` op. A pre/post hook pair on the
root module marks step boundaries and builds the row table from the forward's kwargs.
`generate` is wrapped (an instance attribute, removed on disarm) only to know which
forwards continue which requests and which rows finished at EOS.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from dmi.adapter import Adapter, Binding
from dmi.errors import SpecError, UnknownHookError, closest
from dmi.hooknames import HOOK_TYPE_BY_SUFFIX, canonical_names, resolve, split_layer
from dmi.hookpoint import HookPoint
from dmi.kernels import host_ops
from dmi.kernels.capture_op import capture as capture_op
from dmi.ring import graphplan

from . import reading
from .derive import Derived, StructureError, derive
from .rows import GenerateState, RequestCounter, StepInputs, row_table, step_inputs
from .tables.base import ArchTable, Tap

@dataclass
class HFBinding(Binding):
    tap: Tap | None = None
    path: str = ""
    # Reads the LM head (hook_logits, unembed.hook_in/out): in generate only the rows the
    # engine computes logits for (logits_to_keep), like hook_logits.
    lm_head_rows: bool = False


class HFAdapter(Adapter):
    engine_name = "hf"

    def __init__(self, model: torch.nn.Module, table: ArchTable | None = None, derived: Derived | None = None):
        """table: a hand-written (or plugin) table; its taps override what the structure gives.
        Without one, every tap is derived from the model's structure (adapters.hf.derive);
        `derived` gives the taps instead (adapters.hf.generic: any nn.Module)."""
        super().__init__(model)
        self.model = model
        self.table = table
        self.derived = derived
        if derived is None:
            try:
                self.derived = derive(model)
            except StructureError:
                if table is None:
                    raise
        self.dims = table.dims(model.config) if table is not None else self.derived.dims
        self.counter = RequestCounter()
        self._handles: list = []
        self._gen: GenerateState | None = None
        self._had_generate_attr = False
        self._root = _root_prefix(model, table)
        # GPU: build row tables without reading the device during decode (see rows.LateEos).
        # DMI_SYNC_FREE=1 forces that path on the CPU, where tests check it against the other.
        self.sync_free = self.device.type == "cuda" or os.environ.get("DMI_SYNC_FREE") == "1"
        # Compiled forwards on a GPU capture in-graph from a device-side plan (CUDA graphs can
        # replay it); DMI_GRAPH_PLAN=1 forces that path on the CPU for tests. Otherwise compiled
        # captures go through host ops.
        self.device_plan = self.device.type == "cuda" or os.environ.get("DMI_GRAPH_PLAN") == "1"

    # -- description ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def describe(self) -> tuple[str, dict]:
        cfg = self.model.config
        return getattr(cfg, "_name_or_path", "") or type(self.model).__name__, cfg.to_dict()

    # -- resolution -------------------------------------------------------------------
    def _path(self, tap_module: str, layer: int | None) -> str:
        path = tap_module.replace("{L}", str(layer)) if layer is not None else tap_module
        return self._root(path)

    def _module(self, path: str | None):
        if path is None:
            return None
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def offered(self) -> dict[str, tuple[Tap, str]]:
        """Canonical name -> (tap, module path), for every hook whose module exists in this model."""
        return {name: (tap, path) for name, (tap, path, _) in self.found().items()}

    def found(self) -> dict[str, tuple[Tap, str, str]]:
        """Canonical name -> (tap, module path, how it was found), in forward order."""
        found = self.derived.found if self.derived is not None else {}
        out = {}
        for name in canonical_names(self.dims.n_layers):
            layer, suffix = split_layer(name)
            tap = self.table.taps.get(suffix) if self.table is not None else None
            if tap is not None:
                path = self._path(tap.module, layer)
                if path is not None and self._module(path) is not None:
                    out[name] = (tap, path, f"table {self.table.family!r}")
                    continue
            if name in found and self._module(found[name].path) is not None:
                f = found[name]
                out[name] = (f.tap, f.path, f.how)
        return out

    def _hookpoints(self, offered: dict | None = None) -> dict[str, str]:
        """HookPoint name -> module path. Two HookPoints with one name are refused, and so is a
        HookPoint using a canonical name this model offers elsewhere (it would replace it)."""
        out: dict[str, str] = {}
        for p, m in self.model.named_modules():
            if not isinstance(m, HookPoint):
                continue
            name = m.name or p
            if name in out:
                raise SpecError("hooks", f"two HookPoints are named {name!r} (at {out[name]!r} and {p!r}); "
                                         f"give each a unique name")
            if offered is not None and name in offered and offered[name][1] != p:
                raise SpecError("hooks", f"HookPoint {name!r} at {p!r} uses the name of a hook this model already "
                                         f"offers at {offered[name][1]!r}; a canonical name may only mark that "
                                         f"hook's own place. Rename the HookPoint")
            out[name] = p
        return {n: p for n, p in out.items() if offered is None or n not in offered}

    def _eager(self) -> bool:
        return getattr(self.model.config, "_attn_implementation", "eager") == "eager"

    def _resolve(self, patterns: list[str], offered: dict, hookpoints: dict) -> list[str]:
        # Presets and globs skip hooks that need eager attention it lacks, recomputed ones, and
        # TransformerBridge's component names (mostly other names for the same tensors).
        explicit_only = frozenset(n for n, (tap, _) in offered.items()
                                  if (tap.eager_only and not self._eager()) or tap.fn is not None
                                  or HOOK_TYPE_BY_SUFFIX[split_layer(n)[1]].group == "bridge")
        return resolve(patterns, list(offered), self.dims.n_layers, explicit_only, list(hookpoints))

    def resolve(self, patterns: list[str]) -> list[str]:
        offered = self.offered()
        return self._resolve(patterns, offered, self._hookpoints(offered))

    def bind(self, patterns: list[str]) -> list[Binding]:
        offered = self.offered()
        hookpoints = self._hookpoints(offered)
        names = self._resolve(patterns, offered, hookpoints)
        eager = self._eager()
        bindings = []
        for name in names:
            if name.startswith("module:"):
                tap, path = self._module_tap(name)
            elif name in hookpoints:
                tap, path = Tap(hookpoints[name], shape=lambda d: (0,)), hookpoints[name]
            else:
                tap, path = offered[name]
                if tap.eager_only and not eager:
                    impl = self.model.config._attn_implementation
                    raise SpecError("hooks", f"{name} needs the attention probabilities, which only eager attention "
                                             f"computes; this model uses {impl!r}. Load it with "
                                             f"attn_implementation='eager' or drop the hook")
            row_bytes, shape, dtype = self._row_layout(tap)
            bindings.append(HFBinding(name, f"{path}:{tap.io}", row_bytes, ragged=tap.ragged or tap.view == "pattern",
                                      row_shape=shape, dtype=dtype, tap=tap, path=path,
                                      lm_head_rows=name in ("hook_logits", "unembed.hook_in", "unembed.hook_out")))
        return bindings

    def _module_tap(self, name: str) -> tuple[Tap, str]:
        parts = name.split(":")
        if len(parts) not in (2, 3) or not parts[1] or (len(parts) == 3 and parts[2] not in ("input", "output")):
            raise UnknownHookError("hooks", f"{name!r}: write module hooks as 'module:<dotted.path>' or "
                                            f"'module:<dotted.path>:input'")
        path = parts[1]
        if self._module(path) is None:
            paths = [p for p, _ in self.model.named_modules() if p]
            raise UnknownHookError("hooks", f"{name!r}: the model has no module {path!r}; closest: "
                                            f"{', '.join(closest(path, paths))}")
        io = parts[2] if len(parts) == 3 else "output"
        return Tap(path, io=io, index=0 if io == "input" else None, shape=lambda d: (0,)), path

    def _row_layout(self, tap: Tap) -> tuple[int, tuple[int, ...] | None, torch.dtype | None]:
        """(bytes of one row as estimated at attach, exact row shape, dtype); shape and dtype are
        None where the layout is only known at run time (module:, HookPoint) or ragged (pattern)."""
        shape = tuple(tap.shape(self.dims))
        if tap.dtype:
            dtype = getattr(torch, tap.dtype)
        else:
            p = next(self.model.parameters(), None)
            dtype = p.dtype if p is not None else torch.float32
        row_bytes = math.prod(shape) * dtype.itemsize
        if 0 in shape or tap.ragged or tap.view == "pattern":
            return row_bytes, None, None
        return row_bytes, shape, dtype

    # -- arming -----------------------------------------------------------------------
    def arm(self, session, bindings: list[HFBinding]) -> None:
        self.session = session
        # For torch.compile: hooks call host ops (graph nodes that run every step) instead of
        # the session directly; the token orders them. See dmi.kernels.host_ops.
        # On the CPU always: a host op never becomes part of a CUDA graph.
        self._token = torch.zeros(1)
        self._bridge = host_ops.register_bridge(self)
        self._graph = session.graph_plan() if self.device_plan else None
        self._logits_hooks = [i for i, b in enumerate(bindings) if b.name == "hook_logits"]
        for i, b in enumerate(bindings):
            tap, path = b.tap, b.path
            mod = self.model.get_submodule(path) if path else self.model
            fn = functools.partial(_capture_hook, self, i, tap, self.dims)
            if tap.io == "input":
                h = mod.register_forward_pre_hook(lambda m, a, k, _fn=fn: _fn(a, k, None), with_kwargs=True)
            else:
                h = mod.register_forward_hook(lambda m, a, k, o, _fn=fn: _fn(a, k, o), with_kwargs=True)
            self._handles.append(h)
        # Step boundaries: registered last on the root so the pre-hook runs after any user
        # pre-hook that rewrites inputs, and the post-hook seals after all captures.
        self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end, always_call=True))
        self._had_generate_attr = "generate" in self.model.__dict__
        self._saved_generate = self.model.__dict__.get("generate")
        if hasattr(self.model, "generate"):
            self.model.generate = functools.partial(_generate, self, self.model.generate)

    def disarm(self) -> None:
        host_ops.unregister_bridge(getattr(self, "_bridge", 0))
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._had_generate_attr:
            self.model.generate = self._saved_generate
        else:
            self.model.__dict__.pop("generate", None)
        self._gen = None

    # -- step boundaries --------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        inp = step_inputs(args, kwargs)
        if torch.compiler.is_compiling():
            # (generate with a static cache passes a dict of prepared masks and no cache_position;
            # its rows are placed from the mask generate was given, see rows.GenerateState.user_mask)
            if (inp.cache_position is None and inp.mask is None and inp.past is not None
                    and not isinstance(kwargs.get("attention_mask"), dict)):
                raise ValueError("dmi: a compiled forward with a KV cache needs cache_position or attention_mask "
                                 "to place its rows (generate passes both)")
            if self._graph is not None:
                keep = kwargs.get("logits_to_keep", 0)
                host_ops.plan_step(self._graph.ctrl, self._graph.rows, self._bridge, inp.ref, inp.is_ids, inp.mask,
                                   inp.cache_position, keep if isinstance(keep, int) else 0)
                self._trace_bt = (inp.ref.shape[0], inp.ref.shape[1])
            else:
                host_ops.step_begin(self._token, self._bridge, inp.ref, inp.is_ids, inp.mask, inp.cache_position)
        else:
            self.session.begin_step(row_table(inp, self.counter, self._gen, self.sync_free, self.session.step))

    def _end(self, module, args, output):
        if torch.compiler.is_compiling():
            if self._graph is not None:
                host_ops.commit_step(self._token, self.session.ring.buffer, self._bridge)
            else:
                host_ops.step_end(self._token, self._bridge)
        else:
            self.session.end_step()

    # -- host side of the compiled path (called by dmi.kernels.host_ops) ---------------
    def op_step_begin(self, ref, is_ids, mask, cache_position) -> None:
        self.session.begin_step(row_table(StepInputs(ref, is_ids, mask, cache_position), self.counter, self._gen,
                                          self.sync_free, self.session.step))

    def op_capture(self, hook: int, x: torch.Tensor, flat: bool) -> None:
        self.session.capture(hook, x, flat=flat)

    def op_step_end(self) -> None:
        self.session.end_step()

    def op_plan_step(self, ref, is_ids, mask, cache_position, logits_to_keep: int) -> None:
        self.op_step_begin(ref, is_ids, mask, cache_position)
        T = int(ref.shape[1])
        last = frozenset(self._logits_hooks) if logits_to_keep == 1 and T > 1 else frozenset()
        self._graph.plan(last)

    def op_commit_step(self) -> None:
        self._graph.commit()
        self.session.end_step()


def _capture_hook(adapter: HFAdapter, i: int, tap: Tap, dims, args, kwargs, output) -> None:
    x = reading.pick(tap, args, kwargs, output)
    if isinstance(x, torch.Tensor):
        x = reading.view(tap, x.detach(), dims)
        if torch.compiler.is_compiling():
            graph = adapter._graph
            if graph is None:
                host_ops.capture_host(adapter._token, adapter._bridge, i, x, tap.flat)
                return
            rows_x = x if tap.flat else x.flatten(0, 1)
            graph.check(i, rows_x)
            B, T = adapter._trace_bt
            g = graphplan.group(rows_x.shape[0], B, T)
            if g is None:
                raise ValueError(f"dmi: {adapter.session.names[i]}: {rows_x.shape[0]} rows in a {B}x{T} compiled "
                                 f"step; only all tokens or the last token per batch row can be planned")
            capture_op(adapter.session.ring.buffer, rows_x, graph.rows[g], graph.ctrl, i)
        else:
            adapter.session.capture(i, x, flat=tap.flat)


def _generate(adapter: HFAdapter, original, *args, **kwargs):
    cfg = kwargs.get("generation_config") or adapter.model.generation_config
    beams = kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
    if beams > 1:
        raise ValueError(f"dmi: beam search (num_beams={beams}) reorders rows between requests and is not "
                         f"supported while attached; use greedy or sampling (num_beams=1)")
    eos = kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None))
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    if isinstance(eos, torch.Tensor):
        eos_ids = set(eos.flatten().tolist())
    outer = adapter._gen
    adapter._gen = GenerateState(eos_ids={int(e) for e in eos_ids})
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        adapter._gen.user_mask = mask.detach().to("cpu")  # once per generate, before any step
    try:
        return original(*args, **kwargs)
    finally:
        adapter._gen = outer


def _root_prefix(model, table: ArchTable | None):
    """Tables are written from the causal-LM root ("model.layers..."). A bare base model
    (Qwen3Model, GPT2Model) has the same modules one level up; lm_head is then absent.
    Derived taps are found on the model itself and need no prefix."""
    if table is None:
        return lambda path: path
    first = table.layers_path.split(".")[0]
    if hasattr(model, first):
        return lambda path: path
    return lambda path: path[len(first) + 1:] if path.startswith(first + ".") else None
