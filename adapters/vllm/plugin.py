"""Registers the vLLM adapter through dmi's `dmi` entry-point group."""
from __future__ import annotations

from dmi.plugins import hookimpl


@hookimpl
def dmi_arch_tables(engine: str):
    if engine == "vllm":
        from .tables import TABLES

        return list(TABLES)
    return None


@hookimpl
def dmi_adapter_for(engine, tables):
    llm_cls = _llm_class(engine)
    if llm_cls is None or not isinstance(engine, llm_cls):
        return None
    import vllm

    from dmi.errors import EngineNotSupportedError

    from . import SUPPORTED_VERSIONS
    from .front import VllmAdapter
    from .tables import table_for

    version = getattr(vllm, "__version__", "?")
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        raise EngineNotSupportedError(f"dmi's vLLM adapter supports vLLM {', '.join(SUPPORTED_VERSIONS)}.x; "
                                      f"this is vLLM {version}")
    par = engine.llm_engine.vllm_config.parallel_config
    if par.pipeline_parallel_size > 1 or par.data_parallel_size > 1:
        # Pipeline stages hold different layers and data-parallel engines different requests;
        # dmi.open merges only tensor-parallel slices, so refuse rather than mislead.
        raise EngineNotSupportedError(f"dmi's vLLM adapter captures tensor-parallel engines (any "
                                      f"tensor_parallel_size) but not pipeline or data parallel ones; this one has "
                                      f"pipeline_parallel_size={par.pipeline_parallel_size}, "
                                      f"data_parallel_size={par.data_parallel_size}")
    model_type = engine.llm_engine.vllm_config.model_config.hf_config.model_type
    table = table_for(model_type, tables("vllm"))
    if table is None:
        known = sorted({t for tb in tables("vllm") for t in tb.model_types})
        raise EngineNotSupportedError(f"dmi has no vLLM architecture table for model_type {model_type!r}; "
                                      f"known: {', '.join(known)}")
    return VllmAdapter(engine, table)


def _llm_class(engine):
    """vllm.LLM if vLLM is already imported; never imports it for a non-vLLM engine."""
    import sys

    if "vllm" not in sys.modules or not type(engine).__module__.startswith("vllm"):
        return None
    from vllm import LLM

    return LLM
