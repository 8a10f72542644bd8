from .base import LLAMA_LIKE, ArchTable, llama_like_dims

TABLE = ArchTable(family="mistral", model_types=("mistral",), taps=dict(LLAMA_LIKE), dims=llama_like_dims)
