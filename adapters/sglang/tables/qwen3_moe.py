from .base import LLAMA_LIKE, L, SGLangTable, STap, at
from .qwen3 import QWEN3_ATTN

# Sparse layers: `mlp.gate` returns (router logits, bias); `mlp.topk` returns a named tuple
# (weights, ids, ...). Dense layers (mlp_only_layers, or off the sparse step) keep the
# gated MLP and its down_proj (SGLang 0.5.23 has none: see _sparse).
MOE = {
    "mlp.hook_router_logits": STap(at(L + ".mlp.gate", index=0), shape=lambda d: (d.n_experts,)),
    "mlp.hook_topk_weights": STap(at(L + ".mlp.topk", index=0), shape=lambda d: (d.top_k,)),
    "mlp.hook_topk_ids": STap(at(L + ".mlp.topk", index=1), shape=lambda d: (d.top_k,), dtype="int32"),
}


def _sparse(cfg, layer: int) -> bool:
    # SGLang 0.5.23 builds every Qwen3-MoE layer sparse (Qwen3MoeDecoderLayer.stage_facts),
    # whatever mlp_only_layers says; the table follows what the engine computes.
    return getattr(cfg, "num_experts", 0) > 0


def _has(cfg, layer: int, suffix: str) -> bool:
    if suffix in MOE:
        return _sparse(cfg, layer)
    if suffix in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"):
        return not _sparse(cfg, layer)
    return True


TABLE = SGLangTable(family="qwen3_moe", architectures=("Qwen3MoeForCausalLM",),
                    taps={**LLAMA_LIKE, **QWEN3_ATTN, **MOE}, has=_has)
