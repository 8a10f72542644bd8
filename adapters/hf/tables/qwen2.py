from .base import LLAMA_LIKE, ArchTable, llama_like_dims

# Qwen2 differs from Llama only by q/k/v biases, which the projections' outputs already include.
TABLE = ArchTable(family="qwen2", model_types=("qwen2",), taps=dict(LLAMA_LIKE), dims=llama_like_dims)
