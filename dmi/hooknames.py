"""Hook names: one table of hook types, presets, and resolution of user patterns.

Names are TransformerLens's (`blocks.{L}.hook_resid_post`, ...) because users know them.
An engine adapter says which concrete names a model offers; this module only turns a
user's list of names, globs, presets and `module:` paths into a subset of those.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from dmi.errors import UnknownHookError, closest


@dataclass(frozen=True)
class HookType:
    suffix: str        # name without the "blocks.{L}." prefix
    per_layer: bool
    group: str         # resid | norm | attn | mlp | moe | final | bridge (TransformerBridge's component names)
    doc: str


# The single table of hook types every engine's architecture tables map onto.
HOOK_TYPES: tuple[HookType, ...] = (
    # In forward order. Names of group "bridge" are TransformerBridge's (TransformerLens 4): each
    # component's input and output as the model computes them; presets and globs that also match
    # other hooks skip them (name them to select them).
    HookType("hook_embed", False, "resid", "token embeddings: the embedding module's output"),
    HookType("embed.hook_out", False, "bridge", "the embedding module's output (= hook_embed)"),
    HookType("hook_pos_embed", False, "resid", "learned position embeddings (GPT-2 wpe, OPT embed_positions)"),
    HookType("hook_in", True, "bridge", "the decoder layer's input (= hook_resid_pre)"),
    HookType("hook_resid_pre", True, "resid", "residual stream entering the block"),
    HookType("ln1.hook_in", True, "bridge", "the attention input norm's input"),
    HookType("ln1.hook_scale", True, "norm", "the attention input norm's scale [1]: sqrt(mean(x^2) + eps), of x - mean for LayerNorm"),
    HookType("ln1.hook_normalized", True, "norm", "the attention input norm's x / scale ((x - mean) / scale for LayerNorm), before its weight and bias"),
    HookType("ln1.hook_out", True, "bridge", "the attention input norm's output (after its weight and bias)"),
    HookType("attn.hook_in", True, "bridge", "the attention module's input"),
    HookType("attn.hook_q", True, "attn", "queries [head, d_head], before rotary (after q-norm where the model has one)"),
    HookType("attn.hook_k", True, "attn", "keys [kv_head, d_head], before rotary (after k-norm where the model has one)"),
    HookType("attn.hook_v", True, "attn", "values [kv_head, d_head]"),
    HookType("attn.hook_rot_q", True, "attn", "queries after rotary [head, d_head] (recomputed from the attention's input)"),
    HookType("attn.hook_rot_k", True, "attn", "keys after rotary [kv_head, d_head] (recomputed from the attention's input)"),
    HookType("attn.hook_attn_scores", True, "attn", "attention scores before softmax [head, key_pos], keys 0..position, scaled (and soft-capped) as the model does; masked keys -inf"),
    HookType("attn.hook_pattern", True, "attn", "attention probabilities [head, key_pos], keys 0..position (needs eager attention)"),
    HookType("attn.hook_z", True, "attn", "attention output per head before the output projection [head, d_head]"),
    HookType("attn.hook_out", True, "bridge", "the attention module's output (= hook_attn_out in pre-norm blocks; before the post-attention norm in Gemma 2/3 and OLMo 2, before Granite's residual_multiplier)"),
    HookType("hook_attn_out", True, "attn", "attention block output added to the residual stream"),
    HookType("hook_resid_mid", True, "resid", "residual stream between attention and MLP (sequential blocks only)"),
    HookType("ln2.hook_in", True, "bridge", "the MLP input norm's input (= hook_resid_mid in sequential pre-norm blocks)"),
    HookType("ln2.hook_scale", True, "norm", "the MLP input norm's scale [1]"),
    HookType("ln2.hook_normalized", True, "norm", "the MLP input norm's normalized input, before its weight and bias"),
    HookType("ln2.hook_out", True, "bridge", "the MLP input norm's output (after its weight and bias)"),
    HookType("mlp.hook_in", True, "bridge", "the MLP module's input"),
    HookType("mlp.hook_pre", True, "mlp", "MLP pre-activation (the gate projection's output in a gated MLP)"),
    HookType("mlp.hook_pre_linear", True, "mlp", "gated MLP: the up (linear) projection's output"),
    HookType("mlp.hook_post", True, "mlp", "MLP hidden activation (input of the down projection)"),
    HookType("mlp.hook_router_logits", True, "moe", "MoE router logits [expert]"),
    HookType("mlp.hook_topk_ids", True, "moe", "experts chosen per token [k]"),
    HookType("mlp.hook_topk_weights", True, "moe", "routing weights of the chosen experts [k]"),
    HookType("mlp.hook_out", True, "bridge", "the MLP module's output (= hook_mlp_out in pre-norm blocks, as for attn.hook_out)"),
    HookType("hook_mlp_out", True, "mlp", "MLP (or MoE) block output added to the residual stream"),
    HookType("hook_resid_post", True, "resid", "residual stream leaving the block"),
    HookType("hook_out", True, "bridge", "the decoder layer's output (= hook_resid_post)"),
    HookType("ln_final.hook_in", False, "bridge", "the final norm's input"),
    HookType("ln_final.hook_scale", False, "final", "the final norm's scale [1]"),
    HookType("ln_final.hook_normalized", False, "final", "the final norm's normalized input, before its weight and bias"),
    HookType("ln_final.hook_out", False, "bridge", "the final norm's output (= unembed.hook_in where nothing follows it)"),
    HookType("unembed.hook_in", False, "final", "the LM head's input (the final norm's output after its weight); in generate, only the rows the LM head computes"),
    HookType("hook_logits", False, "final", "LM head output as the model returns it; in generate, only the rows the engine computes"),
    HookType("unembed.hook_out", False, "final", "TransformerLens's name for hook_logits (the same tensor)"),
)
HOOK_TYPE_BY_SUFFIX = {t.suffix: t for t in HOOK_TYPES}

# Presets expand to globs; they select only what the model offers (a dense model has no router).
PRESETS: dict[str, tuple[str, ...]] = {
    "resid": ("blocks.*.hook_resid_pre", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post"),
    "attn": ("blocks.*.attn.hook_q", "blocks.*.attn.hook_k", "blocks.*.attn.hook_v",
             "blocks.*.attn.hook_z", "blocks.*.hook_attn_out"),
    "mlp": ("blocks.*.mlp.hook_pre", "blocks.*.mlp.hook_pre_linear", "blocks.*.mlp.hook_post", "blocks.*.mlp.hook_router_logits", "blocks.*.mlp.hook_topk_ids",
            "blocks.*.mlp.hook_topk_weights", "blocks.*.hook_mlp_out"),
    "norms": ("blocks.*.ln1.*", "blocks.*.ln2.*", "ln_final.*"),
    # Everything but the alias unembed.hook_out (the same tensor as hook_logits). Hooks that are
    # recomputed (rotary q/k, attention scores) are skipped by presets; name them to select them.
    "all": ("hook_embed", "hook_pos_embed", "blocks.*", "ln_final.*", "unembed.hook_in", "hook_logits"),
    # Exactly what HF's output_hidden_states returns: the first block's input (embeddings, with
    # any position embedding or scale the model adds), every block's output but the last, and the
    # final norm's output at every position (HF replaces the last block's output with it).
    "hf-hidden-states": ("blocks.0.hook_resid_pre", "@hf-hidden-states", "ln_final.hook_out"),
}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def canonical_names(n_layers: int, offered: set[str] | None = None) -> list[str]:
    """All canonical names for a model of n_layers, in forward order."""
    names: list[str] = []
    pre = [t for t in HOOK_TYPES if not t.per_layer and not t.suffix.startswith(("ln_final.", "unembed.", "hook_logits"))]
    post = [t for t in HOOK_TYPES if not t.per_layer and t not in pre]
    names += [t.suffix for t in pre]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{t.suffix}" for t in HOOK_TYPES if t.per_layer]
    names += [t.suffix for t in post]
    return [n for n in names if offered is None or n in offered]


def split_layer(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def resolve(patterns: list[str], offered: list[str], n_layers: int,
            explicit_only: frozenset[str] = frozenset(), extra: list[str] = ()) -> list[str]:
    """Turn user patterns into offered hook names, in forward order, without duplicates.

    offered: canonical names the model provides, in forward order.
    explicit_only: names that globs and presets skip (e.g. attention pattern without eager attention);
        naming them exactly still selects them, so the adapter can explain what is missing.
    extra: further exact names the model offers (HookPoint modules placed in user code).
    `module:<path>[:input]` patterns pass through untouched; the adapter checks the path.
    """
    offered_set = set(offered) | set(extra)
    chosen: set[str] = set()
    modules: list[str] = []
    for pat in patterns:
        if pat.startswith("module:"):
            if pat not in modules:
                modules.append(pat)
            continue
        if pat in PRESETS:
            for g in PRESETS[pat]:
                if g == "@hf-hidden-states":
                    chosen.update(f"blocks.{i}.hook_resid_post" for i in range(n_layers - 1))
                elif not any(c in g for c in "*?["):  # a name a preset lists is taken as named
                    chosen.update([g] if g in offered_set else [])
                else:
                    chosen.update(n for n in fnmatch.filter(offered, g) if n not in explicit_only)
            continue
        if any(c in pat for c in "*?["):
            hits = [n for n in fnmatch.filter(offered, pat) if n not in explicit_only] or fnmatch.filter(offered, pat)
            if not hits:
                raise UnknownHookError("hooks", f"pattern {pat!r} matches no hook this model offers; "
                                       f"e.g. {', '.join(offered[:3])}, ... or a preset: {', '.join(PRESETS)}")
            chosen.update(hits)
            continue
        if pat in offered_set:
            chosen.add(pat)
            continue
        raise UnknownHookError("hooks", _unknown_message(pat, offered, n_layers, extra))
    order = {n: i for i, n in enumerate(list(offered) + list(extra))}
    return sorted(chosen, key=order.__getitem__) + modules


def _unknown_message(pat: str, offered: list[str], n_layers: int, extra) -> str:
    layer, suffix = split_layer(pat)
    if layer is not None and layer >= n_layers and any(n.endswith("." + suffix) for n in offered):
        return f"{pat!r}: layer {layer} is out of range; the model has {n_layers} layers (0-{n_layers - 1})"
    if suffix in HOOK_TYPE_BY_SUFFIX and layer is not None:
        return (f"{pat!r}: this model does not offer {suffix} at layer {layer}"
                f"; closest: {', '.join(closest(pat, offered))}")
    return (f"unknown hook {pat!r}; closest: {', '.join(closest(pat, list(offered) + list(extra)))}; "
            f"presets: {', '.join(PRESETS)}; or 'module:<dotted.path>[:input]'")
