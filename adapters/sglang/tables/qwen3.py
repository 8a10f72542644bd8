from .base import LLAMA_LIKE, L, SGLangTable, STap, at, kv_row, q_row

# Qwen3 normalises q and k per head before rotary; SGLang calls q_norm/k_norm on
# [num_tokens * heads, head_dim], so the rows are regrouped per token.
QWEN3_ATTN = {
    "attn.hook_q": STap(at(L + ".self_attn.q_norm"), view="rows_heads", shape=q_row, shard="heads"),
    "attn.hook_k": STap(at(L + ".self_attn.k_norm"), view="rows_kv_heads", shape=kv_row, shard="kv_heads"),
}

TABLE = SGLangTable(family="qwen3", architectures=("Qwen3ForCausalLM",), taps={**LLAMA_LIKE, **QWEN3_ATTN})
