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


class Adapter:
    """Base class. Lifecycle: __init__(engine) -> bind(spec hooks) -> arm(session) -> disarm()."""

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

    def disarm(self) -> None:
        """Remove every trace of arm(): the engine is exactly as before."""
        raise NotImplementedError
