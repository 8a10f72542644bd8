from .base import L, LLAMA_LIKE, ArchTable, Tap, kv_row, q_row, llama_like_dims

# Qwen3 normalises q and k per head before rotary; hook_q/hook_k read the normalised
# heads, which is what attention consumes (before rotary, as TransformerLens's hook_q).
QWEN3_ATTN = {
    "attn.hook_q": Tap(L + ".self_attn.q_norm", shape=q_row),
    "attn.hook_k": Tap(L + ".self_attn.k_norm", shape=kv_row),
}

TABLE = ArchTable(family="qwen3", model_types=("qwen3",), taps={**LLAMA_LIKE, **QWEN3_ATTN}, dims=llama_like_dims)
