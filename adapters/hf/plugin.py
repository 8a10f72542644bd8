"""Registers the HF adapter and its architecture tables, through the `dmi` entry point group."""
from __future__ import annotations

from dmi.plugins import hookimpl


@hookimpl
def dmi_arch_tables(engine: str):
    if engine == "hf":
        from .tables import BUILTIN_TABLES

        return list(BUILTIN_TABLES)
    return None


@hookimpl
def dmi_adapter_for(engine, tables):
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers absent: not our engine
        return None
    if not isinstance(engine, PreTrainedModel):
        return None
    from dmi.errors import EngineNotSupportedError

    from .adapter import HFAdapter

    model_type = getattr(engine.config, "model_type", None)
    for table in tables("hf"):
        if model_type in table.model_types:
            return HFAdapter(engine, table)
    known = sorted({t for table in tables("hf") for t in table.model_types})
    raise EngineNotSupportedError(f"dmi has no HF architecture table for model_type {model_type!r}; known: "
                                  f"{', '.join(known)}. Add one through the dmi_arch_tables plugin hook, or "
                                  f"capture with 'module:<path>' hooks after adding a table")
