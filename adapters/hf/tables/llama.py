from .base import LLAMA_LIKE, ArchTable, llama_like_dims

TABLE = ArchTable(family="llama", model_types=("llama",), taps=dict(LLAMA_LIKE), dims=llama_like_dims)
