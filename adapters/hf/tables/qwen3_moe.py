from .base import L, LLAMA_LIKE, ArchTable, Tap, llama_like_dims
from .qwen3 import QWEN3_ATTN

# Sparse layers replace the MLP with a router (`mlp.gate`, returning logits, top-k weights,
# top-k ids over flattened tokens) and experts; dense layers (mlp_only_layers) keep the
# gated MLP. Which layer has which is read off the loaded model, not the config.
MOE = {
    "mlp.hook_router_logits": Tap(L + ".mlp.gate", index=0, flat=True, shape=lambda d: (d.n_experts,)),
    "mlp.hook_topk_weights": Tap(L + ".mlp.gate", index=1, flat=True, shape=lambda d: (d.top_k,)),
    "mlp.hook_topk_ids": Tap(L + ".mlp.gate", index=2, flat=True, shape=lambda d: (d.top_k,), dtype="int64"),
}

TABLE = ArchTable(family="qwen3_moe", model_types=("qwen3_moe",), taps={**LLAMA_LIKE, **QWEN3_ATTN, **MOE},
                  dims=llama_like_dims)
