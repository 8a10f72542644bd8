"""What an engine adapter provides to the core. Adapters live in dmi.adapters.<engine>;
each is the only code that touches its engine's internals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Binding:
    """A selected hook, bound to a place in the engine."""

    name: str                 # canonical name, or "module:<path>[:input]", or a HookPoint's name
    source: str               # where it is read, for the file: "model.layers.0:output"
    row_bytes: int            # bytes of one token row, estimated at attach (0 if unknown until run)
    ragged: bool = False      # attention pattern: row width grows with position
    # Exact row layout when known at attach; capture inside CUDA graphs needs it (a replayed
    # graph cannot report shapes back), eager capture reads it off each tensor instead.
    row_shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    # Tensor parallel: this rank holds only a slice of the row, (dim, start, stop, full) along
    # one row dim; dmi.open puts the ranks' slices back together. None: the whole row.
    shard: tuple[int, int, int, int] | None = None
    # Which of the step's row tables this hook's tensor rows follow: "tokens" (every token row of
    # the step) or "logits" (rows the engine addresses per request, e.g. each request's last token).
    group: str = "tokens"


class Adapter:
    """Base class of engine adapters (plugin API version 1; docs/plugins.md).

    Lifecycle: __init__(engine) -> resolve/bind(spec hooks) -> arm(session) -> [steps] ->
    flush() -> disarm().

    Invariants an adapter keeps (dmi.testing.run_conformance checks them):
    - before each engine step, outside any compiled region, session.begin_step(RowTable,
      groups={"logits": RowTable}) names the request, position and phase of every token row (and
      of every row of the other row groups its bindings use); padding rows have request -1 and
      are never recorded. The session plans the whole step then;
    - inside the step, binding i's capture point launches dmi::capture on its tensor (rows in its
      group's table order) with the plan's tensors: `session.capture(i, x)` does exactly that,
      and so may a compiled graph (`session.capture_args(i)`);
    - after the step, session.end_step(), also when the forward raised;
    - request ids are the engine's own user-facing ids; positions count the request's real
      tokens from 0;
    - capture never changes what the engine computes; disarm() leaves the engine exactly as it
      was; bind() and a refused attach leave no trace.
    """

    engine_name: str = "?"

    def __init__(self, engine: Any):
        self.engine = engine

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def describe(self) -> tuple[str, dict]:
        """(model name or path, model config as a JSON-able dict)"""
        raise NotImplementedError

    def resolve(self, patterns: list[str]) -> list[str]:
        """The hook names `patterns` select on this engine, without binding anything."""
        raise NotImplementedError

    def bind(self, patterns: list[str]) -> list[Binding]:
        """Resolve the spec's hook patterns to this engine's capture points; raise a SpecError
        subclass naming what is wrong. Must not modify the engine."""
        raise NotImplementedError

    def arm(self, session, bindings: list[Binding]) -> None:
        """Install capture points. bindings[i] is captured as session.capture(i, tensor)."""
        raise NotImplementedError

    def run_attrs(self) -> dict:
        """Extra file attributes for this run. A tensor-parallel rank returns
        {"tp_rank": r, "tp_size": n}: rank r > 0 writes "<sink>.rank<r>" and dmi.open merges."""
        return {}

    def flush(self) -> None:
        """Make every capture the engine has made so far reach the session (an engine that
        captures in other processes or on other streams waits for them here). In-process,
        synchronous engines have nothing to do."""

    def disarm(self) -> None:
        """Remove every trace of arm(): the engine is exactly as before."""
        raise NotImplementedError
