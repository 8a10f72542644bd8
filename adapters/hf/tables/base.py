"""The shape of an HF architecture table: canonical hook name -> where to read it.

A table is data: a module path (with {L} for the layer), input or output, which
element, and how to view the tensor as token rows. Adding a model family is adding
a table file beside this one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from dmi.dims import Dims, kv_row, llama_like_dims, q_row  # noqa: F401  (shared by every engine's tables)


@dataclass(frozen=True)
class Tap:
    module: str                               # dotted path from the causal-LM root; "{L}" is the layer
    io: Literal["output", "input"] = "output"
    index: int | None = None                  # tuple element (outputs) / positional arg (inputs); None: the value
    kw: str | None = None                     # keyword the input may be passed by instead
    view: str | None = None                   # heads | kv_heads | pattern | qkv:<i>  (see adapters.hf.reading)
    flat: bool = False                        # leading dim is batch*tokens (MoE router), not [batch, tokens]
    shape: Callable[[Dims], tuple[int, ...]] = lambda d: (d.hidden,)
    dtype: str | None = None                  # fixed dtype (router ids); None: the model's
    eager_only: bool = False                  # needs attn_implementation="eager"
    # Derived values (adapters.hf.reading): a slice of the last dim before any heads view
    # (fused projections), a [groups, per_group, head_dim] split keeping per_group lo:hi
    # (interleaved fused q/k/v), an explicit head shape, a constant factor and a tanh soft-cap
    # the model applies outside the module, and the norm statistics TransformerLens hooks.
    cols: tuple[int, int] | None = None
    grouped: tuple[int, int, int, int] | None = None
    heads: tuple[int, int] | None = None
    scale: float | None = None
    softcap: float | None = None
    eps: float | None = None                  # norm views: the norm's epsilon
    centered: bool = False                    # norm views: LayerNorm (subtract the mean) vs RMSNorm
    ragged: bool = False                      # row width grows with position (attention pattern, scores)
    # Computed from the hooked module's (args, kwargs, output) instead of picked (rotary q/k,
    # attention scores); bound to the model's own submodules, so not shared between models.
    fn: Callable | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ArchTable:
    family: str
    model_types: tuple[str, ...]              # config.model_type values it serves
    taps: dict[str, Tap]                      # suffix ("hook_embed", "attn.hook_q", ...) -> Tap
    dims: Callable[[object], Dims]
    layers_path: str = "model.layers"
    notes: str = ""
    aliases: dict[str, str] = field(default_factory=dict)


L = "model.layers.{L}"

# Llama-style decoder (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE attention): pre-norm blocks,
# separate q/k/v projections, RMSNorm, gated MLP.
LLAMA_LIKE: dict[str, Tap] = {
    "hook_embed": Tap("model.embed_tokens"),
    "hook_resid_pre": Tap(L, io="input", index=0, kw="hidden_states"),
    "attn.hook_q": Tap(L + ".self_attn.q_proj", view="heads", shape=q_row),
    "attn.hook_k": Tap(L + ".self_attn.k_proj", view="kv_heads", shape=kv_row),
    "attn.hook_v": Tap(L + ".self_attn.v_proj", view="kv_heads", shape=kv_row),
    "attn.hook_z": Tap(L + ".self_attn.o_proj", io="input", index=0, view="heads", shape=q_row),
    "attn.hook_pattern": Tap(L + ".self_attn", index=1, view="pattern", shape=lambda d: (d.n_heads, 1),
                             eager_only=True),
    "hook_attn_out": Tap(L + ".self_attn", index=0),
    "hook_resid_mid": Tap(L + ".post_attention_layernorm", io="input", index=0, kw="hidden_states"),
    "mlp.hook_post": Tap(L + ".mlp.down_proj", io="input", index=0, shape=lambda d: (d.intermediate,)),
    "hook_mlp_out": Tap(L + ".mlp"),
    "hook_resid_post": Tap(L),
    "hook_logits": Tap("lm_head", shape=lambda d: (d.vocab,)),
}
