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
from dataclasses import dataclass, replace

import torch

from dmi.dims import Dims, kv_row, llama_like_dims, q_row

L = "model.layers.{L}"


@dataclass(frozen=True)
class VTap:
    module: str                  # dotted path from the causal-LM root; "{L}" is the layer
    read: str                    # out | out_sum | in0 | in_sum | resid_in | ret0 | ret1  (see read())
    view: str | None = None      # heads | kv_heads | qkv:<0|1|2>
    shape: Callable[[Dims], tuple[int, ...]] = lambda d: (d.hidden,)
    dense_only: bool = False     # only on layers with a dense MLP (MoE models)
    sparse_only: bool = False    # only on MoE layers
    method: str | None = None    # read the return value of this method of the object at `module`
    dtype: torch.dtype | None = None  # fixed row dtype (expert ids); None: the model's
    shard: str | None = None     # tensor parallel: heads | kv_heads | mlp is split across ranks

    @property
    def pre(self) -> bool:
        return self.read in ("in0", "in_sum", "resid_in")


LLAMA_LIKE: dict[str, VTap] = {
    "hook_embed": VTap("model.embed_tokens", "out"),
    "hook_resid_pre": VTap(L, "resid_in"),
    "attn.hook_q": VTap(L + ".self_attn.qkv_proj", "out", view="qkv:0", shape=q_row, shard="heads"),
    "attn.hook_k": VTap(L + ".self_attn.qkv_proj", "out", view="qkv:1", shape=kv_row, shard="kv_heads"),
    "attn.hook_v": VTap(L + ".self_attn.qkv_proj", "out", view="qkv:2", shape=kv_row, shard="kv_heads"),
    "attn.hook_z": VTap(L + ".self_attn.o_proj", "in0", view="heads", shape=q_row, shard="heads"),
    "hook_attn_out": VTap(L + ".self_attn", "out"),
    "hook_resid_mid": VTap(L + ".post_attention_layernorm", "in_sum"),
    "mlp.hook_post": VTap(L + ".mlp.down_proj", "in0", shape=lambda d: (d.intermediate,), dense_only=True,
                          shard="mlp"),
    "hook_mlp_out": VTap(L + ".mlp", "out"),
    "hook_resid_post": VTap(L, "out_sum"),
    "ln_final.hook_out": VTap("model.norm", "out"),
    "hook_logits": VTap("logits_processor", "out", shape=lambda d: (d.vocab,)),
}

# Qwen3 normalises q and k per head before rotary; attention consumes the normalised heads.
QWEN3_QK = {
    "attn.hook_q": VTap(L + ".self_attn.q_norm", "out", view="heads", shape=q_row, shard="heads"),
    "attn.hook_k": VTap(L + ".self_attn.k_norm", "out", view="kv_heads", shape=kv_row, shard="kv_heads"),
}


def _k(d: Dims):
    return (d.top_k,)


MOE_ROUTER = {
    "mlp.hook_router_logits": VTap(L + ".mlp.gate", "out", shape=lambda d: (d.n_experts,), sparse_only=True),
    # select_experts(hidden_states=, router_logits=, ...) -> (topk_weights, topk_ids), weights
    # renormalised when the config says so (norm_topk_prob), as HF's block computes them.
    "mlp.hook_topk_weights": VTap(L + ".mlp.experts.router", "ret0", method="select_experts", shape=_k,
                                  sparse_only=True),
    "mlp.hook_topk_ids": VTap(L + ".mlp.experts.router", "ret1", method="select_experts", shape=_k,
                              sparse_only=True, dtype=torch.int32),
}


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
]


def table_for(model_type: str, tables=TABLES) -> VllmTable | None:
    return next((t for t in tables if model_type in t.model_types), None)


def dense_layers(cfg, n_layers: int) -> set[int]:
    """Layers whose MLP is a plain gated MLP (all of them for dense models)."""
    experts = getattr(cfg, "num_experts", 0) or 0
    if not experts:
        return set(range(n_layers))
    only = set(getattr(cfg, "mlp_only_layers", []) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return {i for i in range(n_layers) if i in only or (i + 1) % step != 0}


def rank_dims(full: Dims, tp_size: int) -> Dims:
    """What one of `tp_size` tensor-parallel ranks holds: vLLM splits q heads and MLP features
    evenly, and kv heads too unless there are fewer than ranks (then each rank keeps one)."""
    if tp_size == 1:
        return full
    return replace(full, n_heads=full.n_heads // tp_size, n_kv_heads=max(1, full.n_kv_heads // tp_size),
                   intermediate=full.intermediate // tp_size)


def shard_of(tap: VTap, full: Dims, tp_size: int, tp_rank: int) -> tuple[int, int, int, int] | None:
    """(row dim, start, stop, full size) of the tap's row that rank `tp_rank` holds; None if whole."""
    if tp_size == 1 or tap.shard is None:
        return None
    total = {"heads": full.n_heads, "kv_heads": full.n_kv_heads, "mlp": full.intermediate}[tap.shard]
    if tap.shard == "kv_heads" and total < tp_size:
        # Fewer kv heads than ranks: vLLM replicates each over tp_size // total ranks in turn.
        head = tp_rank // (tp_size // total)
        return (0, head, head + 1, total)
    n = total // tp_size
    return (0, tp_rank * n, (tp_rank + 1) * n, total)


def row_bytes(tap: VTap, dims: Dims, dtype: torch.dtype) -> int:
    return math.prod(tap.shape(dims)) * torch.empty((), dtype=tap.dtype or dtype).element_size()


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def read(tap: VTap, dims: Dims, args: tuple, kwargs: dict, out) -> torch.Tensor | None:
    """The hook's token rows [num_tokens, ...] from a module call's arguments or output."""
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
    v = tap.view
    if v is None:
        return x
    n = x.shape[0]
    if v == "heads":
        return x.reshape(n, dims.n_heads, dims.head_dim)
    if v == "kv_heads":
        return x.reshape(n, dims.n_kv_heads, dims.head_dim)
    part = int(v.split(":")[1])
    q, kv = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    start = (0, q, q + kv)[part]
    width = q if part == 0 else kv
    heads = dims.n_heads if part == 0 else dims.n_kv_heads
    return x[:, start:start + width].reshape(n, heads, dims.head_dim)
