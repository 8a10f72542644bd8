"""Per-family facts the module structure does not show, for adapters.hf.derive.

Only what differs is written here: whether attention and MLP run in parallel (both read the
block's input), scales the model applies outside any module, and fused-projection layouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Override:
    placement: Callable | None = None          # cfg -> "pre" | "parallel" | "postln"; None: from the norms present
    residual_multiplier: str | None = None     # config field scaling attention/MLP outputs before the residual add
    logits_scale: Callable | None = None       # cfg -> factor the model applies to the LM head's output
    flat_mlp: bool = False                     # MLP projections see [batch*tokens, ...] (OPT)
    fused_qkv: Callable | None = None          # (cfg, dims) -> {"q"|"k"|"v": (groups, per_group, lo, hi)}


def _parallel(attr=None):
    return lambda cfg: "parallel" if (attr is None or getattr(cfg, attr, False)) else "pre"


def _falcon_placement(cfg):
    return "parallel" if (cfg.parallel_attn or cfg.new_decoder_architecture) else "pre"


def _falcon_qkv(cfg, d):
    H, D = d.n_heads, d.head_dim
    if cfg.new_decoder_architecture:  # [kv group, (q heads of the group, k, v), d_head]
        per = H // cfg.num_kv_heads
        return {"q": (cfg.num_kv_heads, per + 2, 0, per), "k": (cfg.num_kv_heads, per + 2, per, per + 1),
                "v": (cfg.num_kv_heads, per + 2, per + 1, per + 2)}
    if not cfg.multi_query:  # [head, (q, k, v), d_head]
        return {"q": (H, 3, 0, 1), "k": (H, 3, 1, 2), "v": (H, 3, 2, 3)}
    return {"q": (1, H + 2, 0, H), "k": (1, H + 2, H, H + 1), "v": (1, H + 2, H + 1, H + 2)}


OVERRIDES: dict[str, Override] = {
    "gpt_neox": Override(placement=_parallel("use_parallel_residual")),
    "gptj": Override(placement=_parallel()),
    "phi": Override(placement=_parallel()),
    "cohere": Override(placement=_parallel(), logits_scale=lambda cfg: cfg.logit_scale),
    "falcon": Override(placement=_falcon_placement, fused_qkv=_falcon_qkv),
    "granite": Override(residual_multiplier="residual_multiplier", logits_scale=lambda cfg: 1.0 / cfg.logits_scaling),
    "opt": Override(placement=lambda cfg: "pre" if cfg.do_layer_norm_before else "postln", flat_mlp=True),
}
