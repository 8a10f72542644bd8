"""SGLang architecture tables, one file per family; canonical names as in dmi/hooknames.py."""
from . import llama, more, qwen2, qwen3, qwen3_moe

BUILTIN_TABLES = [m.TABLE for m in (llama, qwen2, qwen3, qwen3_moe)] + more.TABLES
