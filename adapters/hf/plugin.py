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

    from .derive import StructureError

    model_type = getattr(engine.config, "model_type", None)
    for table in tables("hf"):
        if model_type in table.model_types:
            return HFAdapter(engine, table)
    try:  # no table: every tap from the model's structure
        return HFAdapter(engine)
    except StructureError as e:
        known = sorted({t for table in tables("hf") for t in table.model_types})
        raise EngineNotSupportedError(f"dmi cannot read the structure of this HF model (model_type {model_type!r}): "
                                      f"{e}. Tables exist for: {', '.join(known)}; add one through the "
                                      f"dmi_arch_tables plugin hook") from None
