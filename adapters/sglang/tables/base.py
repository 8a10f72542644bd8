"""The shape of an SGLang architecture table: canonical hook name -> where SGLang computes it.

SGLang's models differ from HF's where the residual stream lives: decoder layers return only
their MLP output and carry the residual to the next layer's fused add-norm
(`input_layernorm(hidden, residual) -> (normed, hidden + residual)`). So the residual
stream is read from the *next* norm's second output, and the last layer's from the final
norm's. Every SGLang tensor is flat ([num_tokens, ...]); views only split heads.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from dmi.dims import Dims, kv_row, llama_like_dims, q_row  # same config fields as HF

__all__ = ["LLAMA_LIKE", "Dims", "SGLangTable", "STap", "Where", "at", "llama_like_dims", "resid_after",
           "resid_before_input"]


@dataclass(frozen=True)
class Where:
    module: str                               # dotted path from the model root
    io: Literal["output", "input"] = "output"
    index: int | str | None = None            # tuple element / positional input / attribute name


@dataclass(frozen=True)
class STap:
    where: Callable[[int | None, Dims], Where]   # (layer, dims) -> where to read it
    view: str | None = None   # heads | kv_heads | rows_heads | rows_kv_heads | q | k | v (fused qkv) | gate | up
    #                           (fused gate_up halves) | last_rows
    shape: Callable[[Dims], tuple[int, ...]] = lambda d: (d.hidden,)
    dtype: str | None = None  # fixed dtype (router ids); None: the model's
    # tensor parallel: heads | kv_heads | mlp split across ranks (dmi.tp); unreduced: a module output
    # each rank holds a partial sum of when the layer does the all-reduce (hooks.HookMap._split)
    shard: str | None = None
    # cfg -> a factor the model applies to this value outside the module (Gemma 2's embedding
    # normaliser, Granite's residual_multiplier), so the row is what the residual stream gets.
    scale: Callable[[object], float] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SGLangTable:
    family: str
    architectures: tuple[str, ...]            # config.architectures[0] values it serves
    taps: dict[str, STap]
    dims: Callable[[object], Dims] = llama_like_dims
    # layer -> does it offer this suffix (a dense layer of a MoE model has no router)
    has: Callable[[object, int, str], bool] = lambda cfg, layer, suffix: True


def at(template: str, io: str = "output", index=None) -> Callable[[int | None, Dims], Where]:
    return lambda layer, d: Where(template.replace("{L}", str(layer)), io, index)


def resid_after(layer: int | None, d: Dims) -> Where:
    """Residual stream leaving `layer`: the add inside the next fused add-norm."""
    if layer + 1 < d.n_layers:
        return Where(f"model.layers.{layer + 1}.input_layernorm", "output", 1)
    return Where("model.norm", "output", 1)


def resid_before(layer: int | None, d: Dims) -> Where:
    if layer == 0:
        return Where("model.embed_tokens")
    return resid_after(layer - 1, d)


def resid_before_input(layer: int | None, d: Dims) -> Where:
    """As resid_before, but layer 0's stream is the layer's own input: models that scale the
    embedding in their forward, outside the embedding module (Gemma 2, Granite)."""
    if layer == 0:
        return Where("model.layers.0", "input", 1)
    return resid_after(layer - 1, d)


L = "model.layers.{L}"

# Llama-style decoders in SGLang (Llama, Qwen2): fused qkv_proj returning (out, bias),
# q/k read before rotary as the HF adapter does.
LLAMA_LIKE: dict[str, STap] = {
    "hook_embed": STap(at("model.embed_tokens")),
    "hook_resid_pre": STap(resid_before),
    "attn.hook_q": STap(at(L + ".self_attn.qkv_proj", index=0), view="q", shape=q_row, shard="heads"),
    "attn.hook_k": STap(at(L + ".self_attn.qkv_proj", index=0), view="k", shape=kv_row, shard="kv_heads"),
    "attn.hook_v": STap(at(L + ".self_attn.qkv_proj", index=0), view="v", shape=kv_row, shard="kv_heads"),
    "attn.hook_z": STap(at(L + ".self_attn.o_proj", io="input", index=0), view="heads", shape=q_row, shard="heads"),
    # (under TP, a partial sum per rank where the layer does the all-reduce: see HookMap._split)
    "hook_attn_out": STap(at(L + ".self_attn"), shard="unreduced"),
    "hook_resid_mid": STap(at(L + ".post_attention_layernorm", index=1)),
    # gate_up_proj returns ([gate | up], bias) (this rank's features under TP)
    "mlp.hook_pre": STap(at(L + ".mlp.gate_up_proj", index=0), view="gate", shape=lambda d: (d.intermediate,),
                         shard="mlp"),
    "mlp.hook_pre_linear": STap(at(L + ".mlp.gate_up_proj", index=0), view="up", shape=lambda d: (d.intermediate,),
                                shard="mlp"),
    "mlp.hook_post": STap(at(L + ".mlp.down_proj", io="input", index=0), shape=lambda d: (d.intermediate,),
                          shard="mlp"),
    "hook_mlp_out": STap(at(L + ".mlp"), shard="unreduced"),
    "hook_resid_post": STap(resid_after),
    "ln_final.hook_out": STap(at("model.norm", index=0)),
    # The logits processor computes one row per request (its last token): see adapters/sglang/rows.py.
    "hook_logits": STap(at("logits_processor", index="next_token_logits"), view="last_rows",
                        shape=lambda d: (d.vocab,)),
}
