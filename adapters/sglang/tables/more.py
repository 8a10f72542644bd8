"""SGLang tables of Phi-3, Mixtral, Gemma 2, Gemma 3 and Granite: the Llama-style reads of base.py
where SGLang's modules match them, and only what differs written here."""
from __future__ import annotations

from .base import LLAMA_LIKE, L, SGLangTable, STap, at, kv_row, q_row, resid_before_input

# Phi-3: SGLang runs it as Llama (fused qkv_proj and gate_up_proj).
PHI3 = SGLangTable(family="phi3", architectures=("Phi3ForCausalLM",), taps=dict(LLAMA_LIKE))

# Mixtral: every layer a MoE block `block_sparse_moe`; `gate` returns (router logits, bias),
# `topk` a named tuple (weights, ids, ...).
MIXTRAL = SGLangTable(family="mixtral", architectures=("MixtralForCausalLM",), taps={
    **{k: v for k, v in LLAMA_LIKE.items()
       if k not in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out")},
    "hook_mlp_out": STap(at(L + ".block_sparse_moe"), shard="unreduced"),
    "mlp.hook_router_logits": STap(at(L + ".block_sparse_moe.gate", index=0), shape=lambda d: (d.n_experts,)),
    "mlp.hook_topk_weights": STap(at(L + ".block_sparse_moe.topk", index=0), shape=lambda d: (d.top_k,)),
    "mlp.hook_topk_ids": STap(at(L + ".block_sparse_moe.topk", index=1), shape=lambda d: (d.top_k,), dtype="int32"),
})


def _normaliser(cfg) -> float:
    return cfg.hidden_size ** 0.5


def _residual_multiplier(cfg) -> float:
    return cfg.residual_multiplier


# Gemma 2/3: sandwich norms. Attention and MLP outputs reach the stream through their own
# post-norms; the pre-MLP norm is the fused add-norm (its second output is the stream between).
SANDWICH = {
    **LLAMA_LIKE,
    "hook_attn_out": STap(at(L + ".post_attention_layernorm")),
    "hook_resid_mid": STap(at(L + ".pre_feedforward_layernorm", index=1)),
    "hook_mlp_out": STap(at(L + ".post_feedforward_layernorm")),
}
# Gemma 2 scales the embedding by sqrt(hidden) in the model's forward, in place after the embedding
# module (HF's embedding module includes it): hook_embed applies it, layer 0's stream is its input.
GEMMA2 = SGLangTable(family="gemma2", architectures=("Gemma2ForCausalLM",), taps={
    **SANDWICH,
    "hook_embed": STap(at("model.embed_tokens"), scale=_normaliser),
    "hook_resid_pre": STap(resid_before_input),
})
# Gemma 3's embedding module scales itself; q_norm/k_norm see [tokens, heads, head_dim].
GEMMA3 = SGLangTable(family="gemma3", architectures=("Gemma3ForCausalLM",), taps={
    **SANDWICH,
    "attn.hook_q": STap(at(L + ".self_attn.q_norm"), view="rows_heads", shape=q_row, shard="heads"),
    "attn.hook_k": STap(at(L + ".self_attn.k_norm"), view="rows_kv_heads", shape=kv_row, shard="kv_heads"),
})
# Granite: attention and MLP outputs times residual_multiplier where they join the stream; the
# embedding multiplier is applied in place after the embedding module (hook_embed is the module's
# output, as on HF; layer 0's stream is the layer's input).
GRANITE = SGLangTable(family="granite", architectures=("GraniteForCausalLM",), taps={
    **LLAMA_LIKE,
    "hook_resid_pre": STap(resid_before_input),
    "hook_attn_out": STap(at(L + ".self_attn"), scale=_residual_multiplier, shard="unreduced"),
    "hook_mlp_out": STap(at(L + ".mlp"), scale=_residual_multiplier, shard="unreduced"),
})

TABLES = [PHI3, MIXTRAL, GEMMA2, GEMMA3, GRANITE]
