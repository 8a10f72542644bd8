from .base import LLAMA_LIKE, SGLangTable

# q/k/v biases are inside qkv_proj's output already.
TABLE = SGLangTable(family="qwen2", architectures=("Qwen2ForCausalLM",), taps=dict(LLAMA_LIKE))
