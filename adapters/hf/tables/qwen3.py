from .base import L, LLAMA_LIKE, ArchTable, Tap, _kv, _q, llama_like_dims

# Qwen3 normalises q and k per head before rotary; hook_q/hook_k read the normalised
# heads, which is what attention consumes (before rotary, as TransformerLens's hook_q).
QWEN3_ATTN = {
    "attn.hook_q": Tap(L + ".self_attn.q_norm", shape=_q),
    "attn.hook_k": Tap(L + ".self_attn.k_norm", shape=_kv),
}

TABLE = ArchTable(family="qwen3", model_types=("qwen3",), taps={**LLAMA_LIKE, **QWEN3_ATTN}, dims=llama_like_dims)
