"""Registers the SGLang adapter with dmi (entry-point group `dmi`). Imports nothing from
SGLang unless the engine handed to dmi.attach is one of its objects."""
from __future__ import annotations

import sys

from dmi.plugins import hookimpl


@hookimpl
def dmi_arch_tables(engine: str):
    if engine == "sglang":
        from .tables import BUILTIN_TABLES

        return list(BUILTIN_TABLES)
    return None


@hookimpl
def dmi_adapter_for(engine, tables):
    if "sglang" not in sys.modules or not type(engine).__module__.startswith("sglang"):
        return None
    from sglang.srt.entrypoints.engine import Engine

    if not isinstance(engine, Engine):
        return None
    from .frontend import SGLangAdapter

    return SGLangAdapter(engine, tables("sglang"))
