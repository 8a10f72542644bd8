"""dmi's adapter for the toy engine: the only code here that knows both dmi and the engine.

Capture points are forward hooks on the modules the table names; each passes its tensor to
`session.capture(i, x, flat=True)` because the engine's batch is flat ([num_tokens, ...]).
Step boundaries come from the engine's own `step_listeners`, which also hands over the batch's
request ids, positions and phases. disarm() removes the hooks and the listener, nothing else
was touched.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from dmi.adapter import Adapter, Binding
from dmi.errors import UnknownHookError, closest
from dmi.hooknames import canonical_names, resolve, split_layer

from .engine import Engine, StepBatch
from .rows import row_table
from .table import TABLE, Dims, Tap, ToyTable


class ToyAdapter(Adapter):
    engine_name = "toyengine"

    def __init__(self, engine: Engine, table: ToyTable = TABLE):
        super().__init__(engine)
        self.model = engine.model
        self.table = table
        self.dims: Dims = table.dims(engine.config)
        self._plan: list[tuple[Tap, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._listener: _StepRows | None = None

    # -- description ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def describe(self) -> tuple[str, dict]:
        cfg = self.engine.config
        config = dataclasses.asdict(cfg) | {"max_batch": self.engine.max_batch, "seed": self.engine.seed}
        return f"toyengine/{cfg.arch}-seed{self.engine.seed}", config

    # -- resolution -------------------------------------------------------------------
    def offered(self) -> dict[str, tuple[Tap, str]]:
        """Canonical name -> (tap, module path), in forward order."""
        out = {}
        for name in canonical_names(self.dims.n_layers):
            layer, suffix = split_layer(name)
            tap = self.table.taps.get(suffix)
            if tap is not None:
                out[name] = (tap, tap.module.replace("{L}", str(layer)))
        return out

    def resolve(self, patterns: list[str]) -> list[str]:
        return resolve(patterns, list(self.offered()), self.dims.n_layers)

    def bind(self, patterns: list[str]) -> list[Binding]:
        names = self.resolve(patterns)
        offered = self.offered()
        plan, bindings = [], []
        for name in names:
            tap, path = self._module_tap(name) if name.startswith("module:") else offered[name]
            plan.append((tap, path))
            bindings.append(Binding(name, f"model.{path}:{tap.io}", self._row_bytes(tap, name)))
        self._plan = plan  # only after every name bound: a refused bind leaves no half plan
        return bindings

    def _module_tap(self, name: str) -> tuple[Tap, str]:
        parts = name.split(":")
        if len(parts) not in (2, 3) or not parts[1] or (len(parts) == 3 and parts[2] not in ("input", "output")):
            raise UnknownHookError("hooks", f"{name!r}: write module hooks as 'module:<dotted.path>' or "
                                            f"'module:<dotted.path>:input' (paths under engine.model)")
        path = parts[1]
        try:
            self.model.get_submodule(path)
        except AttributeError:
            paths = [p for p, _ in self.model.named_modules() if p]
            raise UnknownHookError("hooks", f"{name!r}: the toy model has no module {path!r}; closest: "
                                            f"{', '.join(closest(path, paths))}") from None
        return Tap(path, io=parts[2] if len(parts) == 3 else "output"), path

    def _row_bytes(self, tap: Tap, name: str) -> int:
        if name.startswith("module:"):
            return 0  # an arbitrary module's row shape is known only when it runs
        p = next(self.model.parameters(), None)
        return math.prod(tap.shape(self.dims)) * (p.element_size() if p is not None else 4)

    # -- arming -----------------------------------------------------------------------
    def arm(self, session, bindings: list[Binding]) -> None:
        try:
            for i, (tap, path) in enumerate(self._plan):
                mod = self.model.get_submodule(path)
                fn = functools.partial(_capture, session, i, tap, self.dims)
                if tap.io == "input":
                    h = mod.register_forward_pre_hook(lambda m, args, _fn=fn: _fn(args, None))
                else:
                    h = mod.register_forward_hook(lambda m, args, out, _fn=fn: _fn(args, out))
                self._handles.append(h)
            # Registered last, so a step only begins once every capture point is in place.
            self._listener = _StepRows(session)
            self.engine.step_listeners.append(self._listener)
        except BaseException:
            self.disarm()  # the session does not disarm a failed arm: leave nothing behind
            raise

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._listener is not None:
            # By identity: another listener that compares equal must stay.
            self.engine.step_listeners[:] = [x for x in self.engine.step_listeners if x is not self._listener]
            self._listener = None


class _StepRows:
    """The engine's step listener: opens and seals one dmi frame per engine step."""

    def __init__(self, session):
        self.session = session

    def begin(self, batch: StepBatch) -> None:
        self.session.begin_step(row_table(batch))

    def end(self, batch: StepBatch) -> None:
        self.session.end_step()


def _capture(session, i: int, tap: Tap, dims: Dims, args: tuple, output) -> None:
    if tap.io == "input":
        x = args[tap.index] if len(args) > tap.index else None
    else:
        x = output
    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    if not isinstance(x, torch.Tensor):
        return
    x = x.detach()
    if tap.view == "heads":
        x = x.unflatten(-1, (dims.n_heads, dims.head_dim))
    elif tap.view == "kv_heads":
        x = x.unflatten(-1, (dims.n_kv_heads, dims.head_dim))
    session.capture(i, x, flat=True)
