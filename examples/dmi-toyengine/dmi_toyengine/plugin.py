"""Registers the toy engine's adapter and table with dmi (entry-point group `dmi`, name `toyengine`)."""
from __future__ import annotations

from dmi.plugins import hookimpl

ENGINE_KIND = "toyengine"


@hookimpl
def dmi_arch_tables(engine: str):
    if engine == ENGINE_KIND:
        from .table import TABLE

        return [TABLE]
    return None


@hookimpl
def dmi_adapter_for(engine, tables):
    from .engine import Engine

    if not isinstance(engine, Engine):
        return None  # not ours: let the next plugin look
    from dmi.errors import EngineNotSupportedError

    from .adapter import ToyAdapter

    arch = engine.config.arch
    # Any plugin may register a table for another toy architecture through dmi_arch_tables.
    for table in tables(ENGINE_KIND):
        if table.arch == arch:
            return ToyAdapter(engine, table)
    known = sorted({t.arch for t in tables(ENGINE_KIND)})
    raise EngineNotSupportedError(f"dmi-toyengine has no table for arch {arch!r}; known: {', '.join(known)}")
