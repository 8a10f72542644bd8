"""Errors dmi raises. Bad input is a ValueError subclass raised at attach, naming the field."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DmiError(Exception):
    """Base class for dmi's own runtime errors (not bad input)."""


class SpecError(ValueError):
    """A CaptureSpec field is invalid. `field` names it; the message says the valid choices."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownHookError(SpecError):
    pass


class RingTooSmallError(SpecError):
    pass


class SinkPathError(SpecError):
    def __init__(self, message: str, field: str = "sink"):
        super().__init__(field, message)


class RunFileError(DmiError, ValueError):
    """A run file cannot be read (missing parts, not HDF5, not dmi's, damaged). Names the file."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path!r}: {message}")


class EngineNotSupportedError(ValueError):
    """No registered adapter recognises the engine object."""


class SessionStateError(DmiError):
    """attach/detach called in the wrong state (a second session on one engine, ...)."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return found or difflib.get_close_matches(name, choices, n=n, cutoff=0.0)[:n]
