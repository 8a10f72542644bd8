"""An independent oracle: what an unpadded single-sequence HF forward computes at every
position, read with output_hidden_states / output_attentions, a few plain forward hooks,
and algebra on the residual stream. It shares no code with dmi's architecture tables."""
from __future__ import annotations

import torch


def reference(model, seq: list[int]) -> dict[str, torch.Tensor]:
    cfg = model.config
    gpt2 = cfg.model_type == "gpt2"
    layers = model.transformer.h if gpt2 else model.model.layers
    rec: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, fn):
        return lambda m, a, o: rec.__setitem__(name, fn(a, o))

    for i, layer in enumerate(layers):
        attn = layer.attn if gpt2 else layer.self_attn
        sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma 2/3: the post-norm's output joins the stream
        mult = getattr(cfg, "residual_multiplier", None) or 1.0  # Granite scales it where it joins
        if sandwich:
            handles.append(layer.post_attention_layernorm.register_forward_hook(
                keep(f"blocks.{i}.hook_attn_out", lambda a, o: o)))
        else:
            handles.append(attn.register_forward_hook(keep(f"blocks.{i}.hook_attn_out",
                                                           lambda a, o, m=mult: o[0] * m)))
        handles.append(layer.register_forward_hook(keep(f"blocks.{i}.hook_resid_post", lambda a, o: o if torch.is_tensor(o) else o[0])))
        oproj = attn.c_proj if gpt2 else attn.o_proj
        handles.append(oproj.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(f"z{i}", a[0])))
        mlp = layer.mlp
        down = getattr(mlp, "c_proj", None) if gpt2 else getattr(mlp, "down_proj", None)
        if down is not None:
            handles.append(down.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(f"blocks.{i}.mlp.hook_post", a[0])))
        gate = getattr(mlp, "gate", None)
        if gate is not None and not isinstance(gate, torch.nn.Linear):
            handles.append(gate.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(f"router{i}", o)))
    try:
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()

    hs = out.hidden_states
    H = cfg.n_head if gpt2 else cfg.num_attention_heads
    D = cfg.n_embd // H if gpt2 else cfg.head_dim
    KV = H if gpt2 else cfg.num_key_value_heads
    ref = {"hook_embed": _embed(model, seq), "unembed.hook_in": hs[-1][0], "hook_logits": out.logits[0]}
    ref["unembed.hook_out"] = ref["hook_logits"]
    ref["ln_final.hook_out"] = hs[-1][0]  # the final norm's output, after its weight, at every position
    if gpt2:
        with torch.no_grad():
            ref["hook_pos_embed"] = model.transformer.wpe(torch.arange(len(seq)))
    final_in = rec[f"blocks.{len(layers) - 1}.hook_resid_post"][0]
    ref["ln_final.hook_scale"], ref["ln_final.hook_normalized"] = _tl_norm(final_in, gpt2, cfg)
    for i, layer in enumerate(layers):
        pre = hs[i][0]
        ref[f"blocks.{i}.hook_resid_pre"] = pre
        post = rec[f"blocks.{i}.hook_resid_post"][0]
        ref[f"blocks.{i}.hook_resid_post"] = post
        attn_out = rec[f"blocks.{i}.hook_attn_out"][0]
        ref[f"blocks.{i}.hook_attn_out"] = attn_out
        mid = pre + attn_out
        ref[f"blocks.{i}.hook_resid_mid"] = mid
        ref[f"blocks.{i}.hook_mlp_out"] = post - mid
        ref[f"blocks.{i}.ln1.hook_scale"], ref[f"blocks.{i}.ln1.hook_normalized"] = _tl_norm(pre, gpt2, cfg)
        ref[f"blocks.{i}.ln2.hook_scale"], ref[f"blocks.{i}.ln2.hook_normalized"] = _tl_norm(mid, gpt2, cfg)
        with torch.no_grad():
            if gpt2:
                ref[f"blocks.{i}.mlp.hook_pre"] = layer.mlp.c_fc(layer.ln_2(mid))
            elif hasattr(layer.mlp, "gate_proj"):
                ln2 = layer.pre_feedforward_layernorm if hasattr(layer, "pre_feedforward_layernorm") \
                    else layer.post_attention_layernorm
                ref[f"blocks.{i}.mlp.hook_pre"] = layer.mlp.gate_proj(ln2(mid))
                ref[f"blocks.{i}.mlp.hook_pre_linear"] = layer.mlp.up_proj(ln2(mid))
            elif hasattr(layer.mlp, "gate_up_proj"):  # Phi-3: [gate | up] in one projection
                gate, up = layer.mlp.gate_up_proj(layer.post_attention_layernorm(mid)).chunk(2, dim=-1)
                ref[f"blocks.{i}.mlp.hook_pre"], ref[f"blocks.{i}.mlp.hook_pre_linear"] = gate, up
        ref[f"blocks.{i}.attn.hook_z"] = rec[f"z{i}"][0].unflatten(-1, (H, D))
        if f"blocks.{i}.mlp.hook_post" in rec:
            ref[f"blocks.{i}.mlp.hook_post"] = rec[f"blocks.{i}.mlp.hook_post"][0]
        if out.attentions and len(out.attentions) > i and out.attentions[i] is not None:
            ref[f"blocks.{i}.attn.hook_pattern"] = out.attentions[i][0].transpose(0, 1)  # [q, head, k]
        with torch.no_grad():
            if gpt2:
                q, k, v = layer.attn.c_attn(layer.ln_1(pre)).split(cfg.n_embd, dim=-1)
            else:
                x = layer.input_layernorm(pre)
                if hasattr(layer.self_attn, "qkv_proj"):  # Phi-3: q heads, then k heads, then v heads
                    q, k, v = layer.self_attn.qkv_proj(x).split([H * D, KV * D, KV * D], dim=-1)
                else:
                    q, k, v = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
                q, k = q.unflatten(-1, (H, D)), k.unflatten(-1, (KV, D))
                if hasattr(layer.self_attn, "q_norm"):
                    q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
        ref[f"blocks.{i}.attn.hook_q"] = q.reshape(len(seq), H, D)
        ref[f"blocks.{i}.attn.hook_k"] = k.reshape(len(seq), KV, D)
        ref[f"blocks.{i}.attn.hook_v"] = v.reshape(len(seq), KV, D)
        if f"router{i}" in rec:
            logits, weights, ids = rec[f"router{i}"]
            ref[f"blocks.{i}.mlp.hook_router_logits"] = logits
            ref[f"blocks.{i}.mlp.hook_topk_weights"] = weights
            ref[f"blocks.{i}.mlp.hook_topk_ids"] = ids
    return ref


def _tl_norm(x, layer_norm: bool, cfg):
    """TransformerLens's hook_scale and hook_normalized: the norm's statistics, before its weight."""
    eps = cfg.layer_norm_epsilon if layer_norm else cfg.rms_norm_eps
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale, x / scale


def _embed(model, seq):
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(seq))
