"""The vLLM adapter: the only code in dmi that touches vLLM internals.

Caller side (front.py): resolves and validates the spec, then steers the worker sessions
through `LLM.collective_rpc`. Worker side (worker.py, rows.py, tables.py): forward hooks on
the loaded model, row attribution from the model runner's batch state, one ordinary
dmi Session per worker. vllm_plugin.py is vLLM's `general_plugins` entry point: it adds
the worker RPC methods and arms engines built with `additional_config={"dmi": spec}`.
"""
SUPPORTED_VERSIONS = ("0.32",)
