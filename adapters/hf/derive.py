"""Hook taps derived from an HF decoder-only model's structure, so a new family needs no table.

It finds the decoder-layer list, then in each layer the attention, MLP and norm submodules by the
names transformers' modeling code gives them, and decides from which norms a layer has where the
residual stream is read (pre-norm, Gemma 2/3 sandwich norms, OLMo 2 post-norms, or parallel
attention and MLP). What structure cannot show (parallel blocks, scales applied outside modules)
comes from small declarative per-family overrides (tables/overrides.py). Every tap records how it
was found; every hook the model does not get records why.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch

from dmi.dims import Dims

from .tables.base import Tap
from .tables.overrides import OVERRIDES, Override

ATTN = ("self_attn", "attn", "attention", "self_attention")
MLP = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
LN1 = ("input_layernorm", "ln_1", "ln_attn", "self_attn_layer_norm", "attention_norm")
LN2 = {"pre": ("post_attention_layernorm", "ln_2", "final_layer_norm", "ffn_norm"),
       "sandwich": ("pre_feedforward_layernorm",),
       "parallel": ("ln_mlp", "post_attention_layernorm", "ln_2")}
FINAL_NORM = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")
POS_EMBED = ("wpe", "embed_positions", "position_embeddings")
OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")
MLP_IN = ("c_fc", "fc1", "dense_h_to_4h", "up_proj", "w1")
MLP_OUT = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2")


class StructureError(ValueError):
    pass


@dataclass
class Found:
    tap: Tap
    path: str
    how: str


@dataclass
class Derived:
    layers_path: str
    dims: Dims
    found: dict[str, Found]                       # canonical name -> where it is read
    missing: dict[str, str] = field(default_factory=dict)  # suffix -> why this model lacks it
    placement: str = "pre"


def _const(shape):
    shape = tuple(shape)
    return lambda d: shape


def _child(mod, names):
    for n in names:
        c = getattr(mod, n, None)
        if isinstance(c, torch.nn.Module):
            return n, c
    return None, None


def _io(mod) -> tuple[int, int] | None:
    """(in, out) features of a Linear or GPT-2 Conv1D."""
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor):
        return w.shape[0], w.shape[1]
    return None


def _norm_kind(mod) -> tuple[float, bool] | None:
    """(eps, centered) for a LayerNorm or RMSNorm; None for anything else."""
    name = type(mod).__name__
    eps = next((getattr(mod, a) for a in ("variance_epsilon", "eps", "epsilon") if hasattr(mod, a)), None)
    if eps is None:
        return None
    if isinstance(mod, torch.nn.LayerNorm) or ("LayerNorm" in name and "RMS" not in name):
        return float(eps), True
    if "RMSNorm" in name or isinstance(mod, getattr(torch.nn, "RMSNorm", ())):
        return float(eps), False
    return None


def find_layers(model) -> tuple[str, torch.nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None)
    for path, mod in model.named_modules():
        if (isinstance(mod, torch.nn.ModuleList) and len(mod) and (n is None or len(mod) == n)
                and any(k in type(mod[0]).__name__ for k in ("Layer", "Block"))):
            return path, mod
    raise StructureError(f"{type(model).__name__}: no decoder-layer list found (a ModuleList of {n} "
                         f"*Layer/*Block modules, as transformers names them)")


def dims_of(cfg, n_layers: int) -> Dims:
    g = lambda *names, default=None: next((getattr(cfg, a) for a in names if getattr(cfg, a, None)), default)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model")
    heads = g("num_attention_heads", "n_head")
    kv = g("num_key_value_heads", "num_kv_heads", default=heads)
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1
    return Dims(n_layers=n_layers, hidden=hidden, n_heads=heads, n_kv_heads=kv,
                head_dim=g("head_dim", default=hidden // heads),
                intermediate=g("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
                vocab=cfg.vocab_size, n_experts=g("num_experts", "num_local_experts", "n_routed_experts", default=0),
                top_k=g("num_experts_per_tok", default=0))


def derive(model) -> Derived:
    cfg = model.config
    ov = OVERRIDES.get(getattr(cfg, "model_type", None), Override())
    layers_path, layers = find_layers(model)
    d = dims_of(cfg, len(layers))
    paths = {id(m): p for p, m in model.named_modules()}
    found: dict[str, Found] = {}
    missing: dict[str, str] = {}
    base_path = layers_path.rpartition(".")[0]
    base = model.get_submodule(base_path) if base_path else model

    def at(p, name):
        return f"{p}.{name}" if p else name

    emb = model.get_input_embeddings()
    if emb is not None and id(emb) in paths:
        found["hook_embed"] = Found(Tap(paths[id(emb)], shape=_const((emb.weight.shape[1],))), paths[id(emb)],
                                    "get_input_embeddings()")
    name, pos = _child(base, POS_EMBED)
    if pos is not None and isinstance(pos, torch.nn.Embedding):
        found["hook_pos_embed"] = Found(Tap(at(base_path, name), shape=_const((pos.weight.shape[1],))),
                                        at(base_path, name), f"position embedding module {name!r}")
    else:
        missing["hook_pos_embed"] = "no learned position embedding module (rotary or none)"

    placement = None
    for i, layer in enumerate(layers):
        lp = at(layers_path, str(i))
        placement = _placement(layer, ov, cfg)
        _layer(found, missing, model, layer, lp, i, d, ov, placement)

    name, fnorm = _child(base, FINAL_NORM)
    if fnorm is not None:
        fp = at(base_path, name)
        kind = _norm_kind(fnorm)
        if kind:
            for hook, view in (("ln_final.hook_scale", "norm_scale"), ("ln_final.hook_normalized", "norm_normalized")):
                shape = (1,) if view == "norm_scale" else (d.hidden,)
                found[hook] = Found(Tap(fp, io="input", index=0, kw="hidden_states", view=view, eps=kind[0],
                                        centered=kind[1], shape=_const(shape)), fp,
                                    f"final norm {name!r} input, normalized as {'LayerNorm' if kind[1] else 'RMSNorm'}")
        else:
            missing["ln_final.hook_normalized"] = f"final norm {type(fnorm).__name__} is neither LayerNorm nor RMSNorm"
        found["ln_final.hook_in"] = Found(Tap(fp, io="input", index=0, kw="hidden_states"), fp, f"final norm {name!r} input")
        found["ln_final.hook_out"] = Found(Tap(fp), fp, f"final norm {name!r} output")
    else:
        missing["ln_final.hook_normalized"] = f"no final norm among {', '.join(FINAL_NORM)}"
    if "hook_embed" in found:
        found["embed.hook_out"] = found["hook_embed"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head) in paths and _io(head):
        hp = paths[id(head)]
        n_in, n_out = _io(head)
        found["unembed.hook_in"] = Found(Tap(hp, io="input", index=0, shape=_const((n_in,))), hp,
                                         "get_output_embeddings() input")
        logits = Tap(hp, shape=_const((n_out,)), scale=ov.logits_scale(cfg) if ov.logits_scale else None,
                     softcap=getattr(cfg, "final_logit_softcapping", None) or None)
        how = "get_output_embeddings() output" + (", times the model's logit scale" if logits.scale else "") + (
            ", soft-capped as the model does" if logits.softcap else "")
        found["hook_logits"] = Found(logits, hp, how)
        found["unembed.hook_out"] = Found(logits, hp, "alias of hook_logits")
    else:
        missing["hook_logits"] = "no LM head (a base model)"
    return Derived(layers_path, d, found, missing, placement or "pre")


def _placement(layer, ov: Override, cfg) -> str:
    if ov.placement is not None:
        return ov.placement(cfg)
    if hasattr(layer, "pre_feedforward_layernorm"):
        return "sandwich"
    if hasattr(layer, "post_feedforward_layernorm") and not any(hasattr(layer, n) for n in LN1):
        return "post"
    return "pre"


def _norm_taps(found, missing, layer, lp, i, which, names, d, flat=False):
    name, norm = _child(layer, names)
    if norm is None:
        missing[f"{which}.hook_normalized"] = f"no {which} norm among {', '.join(names) or '(none in this placement)'}"
        return None
    kind = _norm_kind(norm)
    if kind is None:
        missing[f"{which}.hook_normalized"] = f"{type(norm).__name__} is neither LayerNorm nor RMSNorm"
        return name
    how = f"{name!r} input, normalized as {'LayerNorm' if kind[1] else 'RMSNorm'}"
    found[f"blocks.{i}.{which}.hook_in"] = Found(Tap(f"{lp}.{name}", io="input", index=0, kw="hidden_states",
                                                     flat=flat), f"{lp}.{name}", f"{name!r} input")
    found[f"blocks.{i}.{which}.hook_out"] = Found(Tap(f"{lp}.{name}", flat=flat), f"{lp}.{name}", f"{name!r} output")
    for hook, view, shape in (("hook_scale", "norm_scale", (1,)), ("hook_normalized", "norm_normalized", (d.hidden,))):
        found[f"blocks.{i}.{which}.{hook}"] = Found(
            Tap(f"{lp}.{name}", io="input", index=0, kw="hidden_states", view=view, eps=kind[0], centered=kind[1],
                flat=flat, shape=_const(shape)), f"{lp}.{name}", how)
    return name


def _layer(found, missing, model, layer, lp, i, d: Dims, ov: Override, placement: str) -> None:
    B = f"blocks.{i}."
    hid = _const((d.hidden,))
    found[B + "hook_resid_pre"] = Found(Tap(lp, io="input", index=0, kw="hidden_states", shape=hid), lp,
                                        "decoder layer input")
    found[B + "hook_resid_post"] = Found(Tap(lp, shape=hid), lp, "decoder layer output")
    aname, attn = _child(layer, ATTN)
    mname, mlp = _child(layer, MLP)
    ap, mp = (f"{lp}.{aname}" if attn is not None else None), (f"{lp}.{mname}" if mlp is not None else lp)
    if mlp is None:
        mlp = layer  # OPT: fc1/fc2 sit in the decoder layer itself
    mult = getattr(model.config, ov.residual_multiplier, None) if ov.residual_multiplier else None
    ln2 = None
    if placement in ("post", "postln"):
        missing["ln1.hook_normalized"] = missing["ln2.hook_normalized"] = "post-norm blocks normalize outputs, not inputs"
    else:
        _norm_taps(found, missing, layer, lp, i, "ln1", LN1, d)
        # (OPT flattens tokens before its MLP norm)
        ln2 = _norm_taps(found, missing, layer, lp, i, "ln2", LN2.get(placement, ()), d, flat=ov.flat_mlp)
    # where attention and MLP outputs join the residual stream
    if placement in ("sandwich", "post"):
        found[B + "hook_attn_out"] = Found(Tap(f"{lp}.post_attention_layernorm", shape=hid),
                                           f"{lp}.post_attention_layernorm", "post-attention norm output (added to the residual)")
        found[B + "hook_mlp_out"] = Found(Tap(f"{lp}.post_feedforward_layernorm", shape=hid),
                                          f"{lp}.post_feedforward_layernorm", "post-MLP norm output (added to the residual)")
        if placement == "sandwich":
            p = f"{lp}.pre_feedforward_layernorm"
            found[B + "hook_resid_mid"] = Found(Tap(p, io="input", index=0, kw="hidden_states", shape=hid), p,
                                                "pre-MLP norm input")
        else:
            found[B + "hook_resid_mid"] = Found(Tap(mp, io="input", index=0, kw="hidden_states", shape=hid), mp,
                                                "MLP input (post-norm block)")
    else:
        if attn is not None:
            found[B + "hook_attn_out"] = Found(Tap(ap, index=0, shape=hid, scale=mult), ap,
                                               "attention output" + (" times residual_multiplier" if mult else ""))
        mout = _child(mlp, MLP_OUT)[0] if mname is None else None
        if mname is not None:
            found[B + "hook_mlp_out"] = Found(Tap(mp, shape=hid, scale=mult), mp,
                                              "MLP output" + (" times residual_multiplier" if mult else ""))
        elif mout is not None:
            found[B + "hook_mlp_out"] = Found(Tap(f"{lp}.{mout}", shape=hid, flat=ov.flat_mlp), f"{lp}.{mout}",
                                              f"MLP output projection {mout!r} in the layer")
        if placement == "pre" and ln2 is not None:
            p = f"{lp}.{ln2}"
            found[B + "hook_resid_mid"] = Found(Tap(p, io="input", index=0, kw="hidden_states", shape=hid,
                                                    flat=ov.flat_mlp), p, f"pre-MLP norm {ln2!r} input")
        elif placement == "parallel":
            missing["hook_resid_mid"] = "attention and MLP run in parallel: there is no residual stream between them"
    found[B + "hook_in"], found[B + "hook_out"] = found[B + "hook_resid_pre"], found[B + "hook_resid_post"]
    if attn is not None:
        found[B + "attn.hook_in"] = Found(Tap(ap, io="input", index=0, kw="hidden_states", shape=hid), ap, "attention input")
        found[B + "attn.hook_out"] = Found(Tap(ap, index=0, shape=hid), ap, "attention output")
        _attn(found, missing, model, attn, ap, B, d, ov)
    if mname is not None:
        found[B + "mlp.hook_in"] = Found(Tap(mp, io="input", index=0, kw="hidden_states", shape=hid), mp, "MLP input")
        found[B + "mlp.hook_out"] = Found(Tap(mp, shape=hid), mp, "MLP output")
    _mlp(found, missing, mlp, mp, B, d, ov, own=mname is not None)


def _attn(found, missing, model, attn, ap, B, d: Dims, ov: Override) -> None:
    H, KV, D = d.n_heads, d.n_kv_heads, d.head_dim
    q_src = k_src = None  # (module path, tap) whose output is the head-shaped q / k before rotary
    if hasattr(attn, "kv_a_proj_with_mqa"):  # MLA (DeepSeek-V3)
        cfg = model.config
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        qname = "q_b_proj" if hasattr(attn, "q_b_proj") else "q_proj"
        found[B + "attn.hook_q"] = Found(Tap(f"{ap}.{qname}", view="heads", heads=(H, qk), shape=_const((H, qk))),
                                         f"{ap}.{qname}", f"MLA query projection {qname!r}, before rotary")
        found[B + "attn.hook_z"] = Found(Tap(f"{ap}.o_proj", io="input", index=0, view="heads", heads=(H, cfg.v_head_dim),
                                             shape=_const((H, cfg.v_head_dim))), f"{ap}.o_proj", "o_proj input")
        for s in ("attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores"):
            missing[s] = ("MLA builds keys and values per head from a shared latent (kv_a_proj_with_mqa, kv_b_proj) "
                          "plus one rotary key part; no module output holds them per head")
    else:
        if hasattr(attn, "q_proj") and hasattr(attn, "k_proj") and _io(attn.q_proj) and _io(attn.k_proj):
            H, KV = _io(attn.q_proj)[1] // D, _io(attn.k_proj)[1] // D
            for s, proj, n, norm in (("q", "q_proj", H, "q_norm"), ("k", "k_proj", KV, "k_norm"), ("v", "v_proj", KV, None)):
                nmod = getattr(attn, norm, None) if norm else None
                if nmod is not None:
                    w = getattr(nmod, "weight", None)
                    per_head = w is not None and (w.dim() == 2 or w.numel() == D)
                    view = ("heads_first" if _normed_after_transpose(attn, norm) else None) if per_head else "heads"
                    tap = Tap(f"{ap}.{norm}", view=view, heads=(n, D), shape=_const((n, D)))
                    how = f"{norm!r} output (what attention consumes), before rotary"
                    path = f"{ap}.{norm}"
                elif norm and any(hasattr(attn, f"{s}_layernorm") for s in ("q", "k")):
                    missing[f"attn.hook_{s}"] = f"{type(attn).__name__} normalizes {s} per head after reshaping; not read"
                    continue
                else:
                    tap = Tap(f"{ap}.{proj}", view="heads", heads=(n, D), shape=_const((n, D)))
                    path, how = f"{ap}.{proj}", f"{proj!r} output"
                found[B + f"attn.hook_{s}"] = Found(tap, path, how)
                if s == "q":
                    q_src = (proj, nmod, tap)
                elif s == "k":
                    k_src = (proj, nmod, tap)
        else:
            fused = _fused_qkv(attn, ap, d, ov, model.config)
            if fused is None:
                for s in "qkv":
                    missing[f"attn.hook_{s}"] = f"{type(attn).__name__}: no q_proj/k_proj/v_proj or known fused projection"
            else:
                fname, taps = fused
                for s, tap in taps.items():
                    found[B + f"attn.hook_{s}"] = Found(tap, f"{ap}.{fname}", f"fused projection {fname!r}, split as the model does")
                q_src, k_src = (fname, None, taps["q"]), (fname, None, taps["k"])
        oname, _ = _child(attn, OUT_PROJ)
        if oname is not None:
            found[B + "attn.hook_z"] = Found(Tap(f"{ap}.{oname}", io="input", index=0, view="heads", heads=(H, D),
                                                 shape=_const((H, D))), f"{ap}.{oname}", f"output projection {oname!r} input")
        if q_src is not None and k_src is not None:
            _scores(found, missing, attn, ap, B, d, q_src, k_src)
    found[B + "attn.hook_pattern"] = Found(Tap(ap, index=1, view="pattern", ragged=True, eager_only=True,
                                               shape=_const((H, 1))), ap, "attention module's second output (eager)")


def _fused_qkv(attn, ap, d: Dims, ov: Override, cfg):
    H, KV, D = d.n_heads, d.n_kv_heads, d.head_dim
    for fname in ("c_attn", "qkv_proj", "query_key_value", "Wqkv"):
        mod = getattr(attn, fname, None)
        if mod is None:
            continue
        if ov.fused_qkv is not None:
            layout = ov.fused_qkv(cfg, d)
        elif fname == "query_key_value":  # GPT-NeoX: [head, (q, k, v), d_head]
            layout = {"q": (H, 3, 0, 1), "k": (H, 3, 1, 2), "v": (H, 3, 2, 3)}
        else:  # q heads, then k heads, then v heads; kv heads from the projection's width
            KV = (_io(mod)[1] // D - H) // 2 if _io(mod) else KV
            layout = {"q": (1, H + 2 * KV, 0, H), "k": (1, H + 2 * KV, H, H + KV), "v": (1, H + 2 * KV, H + KV, H + 2 * KV)}
        taps = {}
        for s, (g, per, lo, hi) in layout.items():
            n = g * (hi - lo)
            taps[s] = Tap(f"{ap}.{fname}", view="grouped", grouped=(g, per, lo, hi), heads=(n, D), shape=_const((n, D)))
        return fname, taps
    return None


def _mlp(found, missing, mlp, mp, B, d: Dims, ov: Override, own: bool) -> None:
    gate = getattr(mlp, "gate", None)
    if gate is not None and not isinstance(gate, torch.nn.Linear) and isinstance(getattr(gate, "weight", None), torch.Tensor):
        n_exp, k = gate.weight.shape[0], d.top_k or getattr(gate, "top_k", 0)
        for s, idx, shape, dt in (("router_logits", 0, (n_exp,), None), ("topk_weights", 1, (k,), None),
                                  ("topk_ids", 2, (k,), "int64")):
            found[B + f"mlp.hook_{s}"] = Found(Tap(f"{mp}.gate", index=idx, flat=True, shape=_const(shape), dtype=dt),
                                               f"{mp}.gate", f"router 'gate' output {idx} (tokens flattened)")
        missing["mlp.hook_post"] = "MoE layer: each expert has its own hidden activation"
        return
    flat = ov.flat_mlp and not own
    if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
        inter = _io(mlp.up_proj)[1]
        found[B + "mlp.hook_pre"] = Found(Tap(f"{mp}.gate_proj", flat=flat, shape=_const((inter,))), f"{mp}.gate_proj",
                                          "gate projection output (before the activation)")
        found[B + "mlp.hook_pre_linear"] = Found(Tap(f"{mp}.up_proj", flat=flat, shape=_const((inter,))), f"{mp}.up_proj",
                                                 "up projection output")
    elif hasattr(mlp, "gate_up_proj") and _io(mlp.gate_up_proj):
        inter = _io(mlp.gate_up_proj)[1] // 2
        for s, cols in (("hook_pre", (0, inter)), ("hook_pre_linear", (inter, 2 * inter))):
            found[B + f"mlp.{s}"] = Found(Tap(f"{mp}.gate_up_proj", cols=cols, flat=flat, shape=_const((inter,))),
                                          f"{mp}.gate_up_proj", f"fused gate_up_proj output, columns {cols[0]}:{cols[1]}")
    else:
        name, mod = _child(mlp, MLP_IN)
        if mod is not None and _io(mod):
            found[B + "mlp.hook_pre"] = Found(Tap(f"{mp}.{name}", flat=flat, shape=_const((_io(mod)[1],))), f"{mp}.{name}",
                                              f"input projection {name!r} output (before the activation)")
        else:
            missing["mlp.hook_pre"] = f"no MLP input projection among {', '.join(MLP_IN)}"
    name, mod = _child(mlp, MLP_OUT)
    if mod is not None and _io(mod):
        found[B + "mlp.hook_post"] = Found(Tap(f"{mp}.{name}", io="input", index=0, flat=flat, shape=_const((_io(mod)[0],))),
                                           f"{mp}.{name}", f"output projection {name!r} input")


def _normed_after_transpose(attn, norm: str) -> bool:
    """Whether the attention's forward applies its per-head q/k norm to [batch, head, token, dim]
    (Gemma 3: transposed first) rather than [batch, token, head, dim] (Qwen3). The module tree
    cannot say, and a shape check at run time cannot either when tokens == heads: read the
    modeling code once, at attach."""
    try:
        lines = [ln.strip() for ln in inspect.getsource(type(attn).forward).splitlines()]
    except (OSError, TypeError):
        return False
    call = f"self.{norm}("
    for i, ln in enumerate(lines):
        if call not in ln:
            continue
        arg = ln.split(call, 1)[1].split(")", 1)[0].strip()
        if not arg.isidentifier():
            return False  # normed inline, before any transpose (Qwen3's q_norm(q_proj(..).view(..)))
        for prev in reversed(lines[:i]):
            if prev.startswith(f"{arg} =") or prev.startswith(f"{arg}="):
                return ".transpose(1, 2)" in prev
        return False
    return False


def _scores(found, missing, attn, ap, B, d: Dims, q_src, k_src) -> None:
    """rot_q, rot_k and attention scores, recomputed from the attention module's input with its own
    projections and its modeling module's apply_rotary_pos_emb (rotary models), after the forward."""
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    scaling = next((getattr(attn, a) for a in ("scaling", "inv_norm_factor") if hasattr(attn, a)), None)
    cap = getattr(attn, "attn_logit_softcapping", None) or None
    H, KV = d.n_heads, d.n_kv_heads

    def heads(src, h):
        proj, norm, tap = src
        # .forward, not __call__: dmi's own capture hooks on these modules must not fire twice
        x = getattr(attn, proj).forward(h)
        if tap.view == "grouped":
            from .reading import view
            return view(tap, x, d)
        if norm is not None and tap.view == "heads":  # flat norm (OLMo 2), then heads
            return norm.forward(x).unflatten(-1, tap.heads)
        x = x.unflatten(-1, tap.heads)
        return norm.forward(x) if norm is not None else x

    def rot(args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        q, k = heads(q_src, h).transpose(1, 2), heads(k_src, h).transpose(1, 2)  # [b, head, t, d]
        pe = kwargs.get("position_embeddings")
        if pe is None:
            return q, k
        cos, sin = pe
        r = cos.shape[-1]
        qr, kr = rotary(q[..., :r], k[..., :r], cos, sin)
        return torch.cat([qr, q[..., r:]], -1), torch.cat([kr, k[..., r:]], -1)

    if rotary is not None:
        found[B + "attn.hook_rot_q"] = Found(Tap(ap, fn=lambda a, k, o: rot(a, k)[0].transpose(1, 2),
                                                 shape=_const((H, d.head_dim))), ap,
                                             "recomputed: q projection, then the model's apply_rotary_pos_emb")
        found[B + "attn.hook_rot_k"] = Found(Tap(ap, fn=lambda a, k, o: rot(a, k)[1].transpose(1, 2),
                                                 shape=_const((KV, d.head_dim))), ap,
                                             "recomputed: k projection, then the model's apply_rotary_pos_emb")
    else:
        missing["attn.hook_rot_q"] = "no rotary embedding in this model's attention"
    if scaling is None:
        missing["attn.hook_attn_scores"] = f"{type(attn).__name__} has no scaling attribute to read"
        return
    layer_idx = getattr(attn, "layer_idx", None)

    def scores(args, kwargs, output):
        q, k = rot(args, kwargs)
        cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
        layers = getattr(cache, "layers", None)
        if layers is not None and layer_idx is not None and len(layers) > layer_idx:
            k = layers[layer_idx].keys  # every key this step attended to, as the cache holds them
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        s = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = mask[..., : s.shape[-1]]
            s = s.masked_fill(~mask if mask.dtype == torch.bool else mask < 0, float("-inf"))
        return s.transpose(1, 2)  # [b, t, head, key]

    found[B + "attn.hook_attn_scores"] = Found(
        Tap(ap, fn=scores, ragged=True, shape=_const((H, 1))), ap,
        "recomputed after the forward: rotated q against the cached keys, times the model's scaling"
        + (", soft-capped" if cap else "") + "; masked keys -inf")
