"""Built-in HF architecture tables, one file per family."""
from . import gpt2, llama, mistral, qwen2, qwen3, qwen3_moe

BUILTIN_TABLES = [m.TABLE for m in (llama, mistral, qwen2, qwen3, qwen3_moe, gpt2)]
