from .base import LLAMA_LIKE, SGLangTable

TABLE = SGLangTable(family="llama", architectures=("LlamaForCausalLM",), taps=dict(LLAMA_LIKE))
