"""The HF transformers adapter: the only code that touches an HF model's internals.

Capture points are forward hooks on the modules an architecture table names; each only
launches the `dmi::capture` op with the step's plan (eager, and traced into compiled graphs
alike). A pre/post hook pair on the root module marks step boundaries, builds the row table
from the forward's kwargs and has the session plan the step; compiled calls get their
boundaries from outside the compiled code (compiled.py). `generate` is wrapped (an instance
attribute, removed on disarm) only to know which forwards continue which requests and which
rows finished at EOS; its state is per thread, so concurrent callers keep their own requests.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from dmi.adapter import Adapter, Binding
from dmi.errors import SpecError, UnknownHookError, closest
from dmi.hooknames import HOOK_TYPE_BY_SUFFIX, canonical_names, resolve, split_layer
from dmi.hookpoint import HookPoint
from dmi.kernels.capture_op import capture as capture_op
from dmi.plan import LOGITS, TOKENS

from . import compiled, reading
from . import edits as hf_edits
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
    supports_interventions = True
    keys_needed = True  # set at arm: whether a captured hook reads the key mask (attention patterns)

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
        self._local = threading.local()   # per calling thread: its generate state, its open boundary
        self._saved: dict[tuple[int, str], tuple[object, bool, object]] = {}
        self._outer_hooks: list = []
        self._outer = 0  # brackets open around a compiled call (see compiled.py)
        self._root = _root_prefix(model, table)
        # GPU: build row tables without reading the device during decode (see rows.LateEos).
        # DMI_SYNC_FREE=1 forces that path on the CPU, where tests check it against the other.
        self.sync_free = self.device.type == "cuda" or os.environ.get("DMI_SYNC_FREE") == "1"
        self.wrappers: list = []  # torch.compile(model) wrappers to bracket (dmi.attach fills it)

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
            lm_head = name in ("hook_logits", "unembed.hook_in", "unembed.hook_out")
            bindings.append(HFBinding(name, f"{path}:{tap.io}", row_bytes, ragged=tap.ragged or tap.view == "pattern",
                                      row_shape=shape, dtype=dtype, tap=tap, path=path, lm_head_rows=lm_head,
                                      group=LOGITS if lm_head else TOKENS))
        return bindings

    def editable(self, b: HFBinding) -> str | None:
        """None when interventions can edit binding b's tensor, else why not."""
        return hf_edits.not_editable(b.tap)

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
    @property
    def _gen(self) -> GenerateState | None:
        return getattr(self._local, "gen", None)

    @_gen.setter
    def _gen(self, value) -> None:
        self._local.gen = value

    def arm(self, session, bindings: list[HFBinding]) -> None:
        self.session = session
        compiled.ensure_hook_guards()
        self._logits_hooks = [i for i, b in enumerate(bindings) if b.group == LOGITS]
        # only attention patterns read the key mask (the drain compacts them per request)
        self.keys_needed = any(b.tap.ragged or b.tap.view == "pattern" for b in bindings)
        edited = session.edits.hooks if getattr(session, "edits", None) is not None else {}
        points = [(i, b, edited.get(b.name)) for i, b in enumerate(bindings)]
        points += [(None, he.binding, he) for he in edited.values() if he.capture is None]
        for i, b, he in points:
            tap, path = b.tap, b.path
            mod = self.model.get_submodule(path) if path else self.model
            if he is None:
                fn = functools.partial(_capture_hook, self, i, b, self.dims)
            else:
                fn = functools.partial(hf_edits.hook, self, i, he, self.dims, _capture_rows)
            if tap.io == "input":
                h = mod.register_forward_pre_hook(lambda m, a, k, _fn=fn: _fn(a, k, None), with_kwargs=True)
            else:
                h = mod.register_forward_hook(lambda m, a, k, o, _fn=fn: _fn(a, k, o), with_kwargs=True)
            self._handles.append(h)
        # Step boundaries: registered last on the root so the pre-hook runs after any user
        # pre-hook that rewrites inputs, and the post-hook seals after all captures.
        self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end, always_call=True))
        for w in {id(w): w for w in [*self.wrappers, *compiled.optimized_wrappers(self.model)]}.values():
            self._outer_hooks.append(w.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
            self._outer_hooks.append(w.register_forward_hook(lambda m, a, o: self.outer_end(), always_call=True))
        if hasattr(self.model, "generate"):
            self._replace("generate", functools.partial(_generate, self, self.model.generate))
        if hasattr(self.model, "get_compiled_call"):
            self._replace("get_compiled_call", functools.partial(_get_compiled_call, self, self.model.get_compiled_call))
        if getattr(self.model, "_compiled_call_impl", None) is not None:  # model.compile()
            self._replace("_compiled_call_impl", compiled.bracket(self, self.model._compiled_call_impl))

    def _replace(self, name: str, value) -> None:
        """Set an instance attribute of the model, remembering what disarm restores."""
        d = self.model.__dict__
        self._saved[(id(self.model), name)] = (self.model, name in d, d.get(name))
        d[name] = value

    def disarm(self) -> None:
        for h in [*self._handles, *self._outer_hooks]:
            h.remove()
        self._handles.clear()
        self._outer_hooks.clear()
        for (_, name), (model, had, old) in self._saved.items():
            if had:
                model.__dict__[name] = old
            else:
                model.__dict__.pop(name, None)
        self._saved.clear()
        self._gen = None

    # -- step boundaries --------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            # Traced: nothing when a boundary outside the compiled call began the step (a
            # constant the graph guards on); otherwise a graph break that runs it eagerly.
            if not self._outer:
                compiled.dmi_step_boundary_runs_outside_compiled_code(self._step_begin, args, kwargs)
        elif not (self._outer and self.session._owner == threading.get_ident()):
            self._step_begin(args, kwargs)

    def _end(self, module, args, output):
        if torch.compiler.is_compiling():
            if not self._outer:
                compiled.dmi_step_boundary_runs_outside_compiled_code(self.session.end_step)
        elif not (self._outer and self.session._owner == threading.get_ident()):
            self.session.end_step()

    def _outer_pre(self, module, args, kwargs):
        self.outer_begin(args, kwargs)

    def outer_begin(self, args, kwargs) -> None:
        """A compiled call is about to run: plan its step here, outside the compiled code."""
        if self._outer and self.session._owner == threading.get_ident():
            self._outer += 1  # nested brackets (a compiled module inside a bracketed call)
            return
        self._step_begin(args, kwargs)
        self._outer = 1  # read only by the thread holding the step (the session serialises steps)

    def outer_end(self) -> None:
        if not self._outer or self.session._owner != threading.get_ident():
            return
        self._outer -= 1
        if self._outer == 0:
            self.session.end_step()

    def _step_begin(self, args, kwargs) -> None:
        s = self.session
        s.acquire_step()  # before the row table: it advances the shared request counter
        inp = step_inputs(args, kwargs)
        rows = row_table(inp, self.counter, self._gen, self.sync_free, s.step)
        groups = {}
        keep = kwargs.get("logits_to_keep", 0)
        if self._logits_hooks and keep == 1 and rows.tokens > 1:
            last = np.arange(rows.batch, dtype=np.int64) * rows.tokens + rows.tokens - 1
            groups[LOGITS] = rows.take(last)
        s.begin_step(rows, groups)


def _capture_hook(adapter: HFAdapter, i: int, b: HFBinding, dims, args, kwargs, output) -> None:
    if not adapter.session.wants(i):
        return
    x = reading.pick(b.tap, args, kwargs, output)
    if not isinstance(x, torch.Tensor):
        return
    # detach only where it does something (each torch op here runs once a hook, every step)
    x = reading.view(b.tap, x.detach() if x.requires_grad else x, dims)
    if torch.compiler.is_compiling():
        _capture_rows(adapter, i, b, x if b.tap.flat or x.dim() < 2 else x.flatten(0, 1))
    else:  # eager: the kernel merges [batch, tokens] itself
        adapter.session.capture(i, x, flat=b.tap.flat)


def _capture_rows(adapter: HFAdapter, i: int, b: HFBinding, rows_x: torch.Tensor) -> None:
    s = adapter.session
    if torch.compiler.is_compiling():
        # Traced into the graph: exactly one dmi::capture node reading the plan's tensors.
        if b.row_shape is None or b.dtype is None:
            raise ValueError(f"dmi: {b.name} has no row layout known at attach ({b.source}), which capture inside "
                             f"a compiled forward needs; capture it in eager mode or drop it from the spec")
        if tuple(rows_x.shape[1:]) != tuple(b.row_shape) or rows_x.dtype != b.dtype:
            raise ValueError(f"dmi: {b.name}: a compiled step sees rows of shape {tuple(rows_x.shape[1:])} "
                             f"{rows_x.dtype}, the binding declared {tuple(b.row_shape)} {b.dtype}")
        ring, rows, ctrl, slot = s.capture_args(i)
        capture_op(ring, rows_x, rows, ctrl, slot)
    else:
        s.capture(i, rows_x, flat=True)


def _get_compiled_call(adapter: HFAdapter, original, *args, **kwargs):
    """transformers' compiled __call__ (static-cache generate), bracketed outside the graph."""
    fn = original(*args, **kwargs)
    return fn if getattr(fn, "__dmi_bracket__", False) else compiled.bracket(adapter, fn)


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
    adapter._gen = GenerateState(eos_ids={int(e) for e in eos_ids}, keys_needed=adapter.keys_needed)
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
