"""vLLM architecture tables: canonical hook name -> where vLLM's model holds that value.

vLLM fuses what HF keeps apart, so several reads are algebra on a module's arguments or
outputs rather than one tensor:
- a decoder layer returns (hidden, residual) and takes them back in; the residual stream
  is their sum (resid_pre at layer 0 is the embedding alone: residual is None there);
- post_attention_layernorm(attn_out, residual) adds before it normalises: resid_mid is
  the sum of its arguments;
- qkv_proj emits [q | k | v] concatenated; the config's head counts split it;
- MoE routing: the gate is a module (router logits), but the top-k choice is a method of the
  fused-MoE layer's router object, not a module: its return value is read by wrapping that
  method on the instance.
Hook names are dmi's canonical ones (dmi/hooknames.py), so a spec means the same thing
on the HF and the vLLM engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dmi.dims import Dims, kv_row, llama_like_dims, q_row
from dmi.tp import rank_dims, shard  # noqa: F401  (rank_dims: re-exported)

L = "model.layers.{L}"


@dataclass(frozen=True)
class VTap:
    module: str                  # dotted path from the causal-LM root; "{L}" is the layer
    read: str                    # out | out_sum | in0 | in_sum | resid_in | ret0 | ret1  (see read())
    view: str | None = None      # heads | kv_heads | qkv:<0|1|2> | gate | up (fused gate_up_proj halves)
    shape: Callable[[Dims], tuple[int, ...]] = lambda d: (d.hidden,)
    dense_only: bool = False     # only on layers with a dense MLP (MoE models)
    sparse_only: bool = False    # only on MoE layers
    method: str | None = None    # read the return value of this method of the object at `module`
    dtype: torch.dtype | None = None  # fixed row dtype (expert ids); None: the model's
    shard: str | None = None     # tensor parallel: heads | kv_heads | mlp is split across ranks
    # cfg -> a factor the model applies to this value outside the module (Gemma's embedding
    # normaliser, Granite's residual_multiplier), so the row is what the residual stream gets.
    scale: Callable[[object], float] | None = field(default=None, compare=False)

    @property
    def pre(self) -> bool:
        return self.read in ("in0", "in_sum", "resid_in")


def llama_like(mlp: str = "mlp") -> dict[str, VTap]:
    """Pre-norm decoder with vLLM's fused add-norm: Llama, Qwen2/3, Phi-3, Mixtral. `mlp` is the
    layer's MLP (or MoE block) attribute."""
    M = f"{L}.{mlp}"
    return {
        "hook_embed": VTap("model.embed_tokens", "out"),
        "hook_resid_pre": VTap(L, "resid_in"),
        "attn.hook_q": VTap(L + ".self_attn.qkv_proj", "out", view="qkv:0", shape=q_row, shard="heads"),
        "attn.hook_k": VTap(L + ".self_attn.qkv_proj", "out", view="qkv:1", shape=kv_row, shard="kv_heads"),
        "attn.hook_v": VTap(L + ".self_attn.qkv_proj", "out", view="qkv:2", shape=kv_row, shard="kv_heads"),
        "attn.hook_z": VTap(L + ".self_attn.o_proj", "in0", view="heads", shape=q_row, shard="heads"),
        "hook_attn_out": VTap(L + ".self_attn", "out"),
        "hook_resid_mid": VTap(L + ".post_attention_layernorm", "in_sum"),
        # gate_up_proj emits [gate | up] (on this rank's features under TP): TransformerLens's
        # pre-activation is the gate half, hook_pre_linear the up half.
        "mlp.hook_pre": VTap(M + ".gate_up_proj", "out", view="gate", shape=lambda d: (d.intermediate,),
                             dense_only=True, shard="mlp"),
        "mlp.hook_pre_linear": VTap(M + ".gate_up_proj", "out", view="up", shape=lambda d: (d.intermediate,),
                                    dense_only=True, shard="mlp"),
        "mlp.hook_post": VTap(M + ".down_proj", "in0", shape=lambda d: (d.intermediate,), dense_only=True,
                              shard="mlp"),
        "hook_mlp_out": VTap(M, "out"),
        "hook_resid_post": VTap(L, "out_sum"),
        "ln_final.hook_out": VTap("model.norm", "out"),
        "hook_logits": VTap("logits_processor", "out", shape=lambda d: (d.vocab,)),
    }


LLAMA_LIKE = llama_like()

# Qwen3 normalises q and k per head before rotary; attention consumes the normalised heads.
QWEN3_QK = {
    "attn.hook_q": VTap(L + ".self_attn.q_norm", "out", view="heads", shape=q_row, shard="heads"),
    "attn.hook_k": VTap(L + ".self_attn.k_norm", "out", view="kv_heads", shape=kv_row, shard="kv_heads"),
}


def _k(d: Dims):
    return (d.top_k,)


def moe_router(mlp: str = "mlp") -> dict[str, VTap]:
    M = f"{L}.{mlp}"
    return {
        "mlp.hook_router_logits": VTap(M + ".gate", "out", shape=lambda d: (d.n_experts,), sparse_only=True),
        # select_experts(hidden_states=, router_logits=, ...) -> (topk_weights, topk_ids), weights
        # renormalised when the config says so (norm_topk_prob), as HF's block computes them.
        "mlp.hook_topk_weights": VTap(M + ".experts.router", "ret0", method="select_experts", shape=_k,
                                      sparse_only=True),
        "mlp.hook_topk_ids": VTap(M + ".experts.router", "ret1", method="select_experts", shape=_k,
                                  sparse_only=True, dtype=torch.int32),
    }


MOE_ROUTER = moe_router()


def _gemma_normaliser(cfg) -> float:
    return cfg.hidden_size ** 0.5


# Gemma 2/3: sandwich norms. The attention and MLP outputs reach the residual stream through their
# own post-norms (called with one argument); the pre-MLP norm is the fused add-norm, so the stream
# between them is its arguments' sum. The embedding module's output is scaled by sqrt(hidden) in
# the model's forward (inside HF's embedding module): hook_embed applies it.
SANDWICH = {
    **LLAMA_LIKE,
    "hook_embed": VTap("model.embed_tokens", "out", scale=_gemma_normaliser),
    "hook_attn_out": VTap(L + ".post_attention_layernorm", "out"),
    "hook_resid_mid": VTap(L + ".pre_feedforward_layernorm", "in_sum"),
    "hook_mlp_out": VTap(L + ".post_feedforward_layernorm", "out"),
}
GEMMA3_QK = {  # q_norm/k_norm see [tokens, heads, head_dim]; attention consumes their output
    "attn.hook_q": VTap(L + ".self_attn.q_norm", "out", view="heads", shape=q_row, shard="heads"),
    "attn.hook_k": VTap(L + ".self_attn.k_norm", "out", view="kv_heads", shape=kv_row, shard="kv_heads"),
}


def _residual_multiplier(cfg) -> float:
    return cfg.residual_multiplier


# Granite: plain (unfused) pre-norm layers returning one tensor; attention and MLP outputs are
# scaled by residual_multiplier where they join the stream. The embedding multiplier is applied
# in place after the embedding module (hook_embed is the module's output, as on HF; resid_pre at
# layer 0 carries it), and logits_scaling inside vLLM's logits processor.
GRANITE = {
    **LLAMA_LIKE,
    "hook_attn_out": VTap(L + ".self_attn", "out", scale=_residual_multiplier),
    "hook_mlp_out": VTap(L + ".mlp", "out", scale=_residual_multiplier),
    "hook_resid_post": VTap(L, "out"),
}
MIXTRAL = {k: v for k, v in llama_like("block_sparse_moe").items()
           if k not in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")}


@dataclass(frozen=True)
class VllmTable:
    family: str
    model_types: tuple[str, ...]
    taps: dict[str, VTap]
    dims: Callable[[object], Dims] = llama_like_dims
    notes: str = ""


TABLES = [
    VllmTable("llama", ("llama",), dict(LLAMA_LIKE)),
    VllmTable("qwen2", ("qwen2",), dict(LLAMA_LIKE)),
    VllmTable("qwen3", ("qwen3",), {**LLAMA_LIKE, **QWEN3_QK}),
    # vLLM computes routing inside its fused-MoE kernel (the gate's logits never leave it
    # as a module output), so router logits and top-k are not offered.
    VllmTable("qwen3_moe", ("qwen3_moe",), {**LLAMA_LIKE, **QWEN3_QK, **MOE_ROUTER}),
    VllmTable("phi3", ("phi3",), dict(LLAMA_LIKE), notes="vLLM runs Phi-3 as Llama (fused qkv_proj, gate_up_proj)"),
    VllmTable("mixtral", ("mixtral",), {**MIXTRAL, **moe_router("block_sparse_moe")},
              notes="every layer is sparse: no mlp.hook_post (each expert has its own)"),
    VllmTable("gemma2", ("gemma2",), dict(SANDWICH)),
    VllmTable("gemma3", ("gemma3_text",), {**SANDWICH, **GEMMA3_QK}),
    VllmTable("granite", ("granite",), dict(GRANITE)),
]


def table_for(model_type: str, tables=TABLES) -> VllmTable | None:
    return next((t for t in tables if model_type in t.model_types), None)


def dense_layers(cfg, n_layers: int) -> set[int]:
    """Layers whose MLP is a plain gated MLP (all of them for dense models)."""
    experts = getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0) or 0
    if not experts:
        return set(range(n_layers))
    only = set(getattr(cfg, "mlp_only_layers", []) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return {i for i in range(n_layers) if i in only or (i + 1) % step != 0}


def shard_of(tap: VTap, full: Dims, tp_size: int, tp_rank: int) -> tuple[int, int, int, int] | None:
    """(row dim, start, stop, full size) of the tap's row that rank `tp_rank` holds; None if whole."""
    return shard(tap.shard, full, tp_size, tp_rank)


def row_bytes(tap: VTap, dims: Dims, dtype: torch.dtype) -> int:
    return math.prod(tap.shape(dims)) * torch.empty((), dtype=tap.dtype or dtype).element_size()


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def read(tap: VTap, dims: Dims, args: tuple, kwargs: dict, out, factor: float | None = None) -> torch.Tensor | None:
    """The hook's token rows [num_tokens, ...] from a module call's arguments or output, times
    `factor` (the tap's scale on this model's config) when it has one."""
    r = tap.read
    if r == "out":
        x = _first(out)
    elif r == "out_sum":
        x = out[0] + out[1]
    elif r == "in0":
        x = args[0] if args else next(iter(kwargs.values()))
    elif r == "in_sum":
        x = args[0] if len(args) < 2 or args[1] is None else args[0] + args[1]
    elif r in ("ret0", "ret1"):
        x = out[int(r[-1])] if isinstance(out, (tuple, list)) else None
    elif r == "resid_in":
        h = args[1] if len(args) > 1 else kwargs["hidden_states"]
        res = args[2] if len(args) > 2 else kwargs.get("residual")
        x = h if res is None else h + res
    else:
        raise ValueError(f"unknown read {r!r}")
    if not isinstance(x, torch.Tensor):
        return None
    x = x.detach()
    if factor is not None:
        x = x * factor
    v = tap.view
    if v is None:
        return x
    n = x.shape[0]
    if v == "heads":
        return x.reshape(n, dims.n_heads, dims.head_dim)
    if v == "kv_heads":
        return x.reshape(n, dims.n_kv_heads, dims.head_dim)
    if v in ("gate", "up"):
        half = x.shape[-1] // 2
        return x[:, :half] if v == "gate" else x[:, half:]
    part = int(v.split(":")[1])
    q, kv = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    start = (0, q, q + kv)[part]
    width = q if part == 0 else kv
    heads = dims.n_heads if part == 0 else dims.n_kv_heads
    return x[:, start:start + width].reshape(n, heads, dims.head_dim)
