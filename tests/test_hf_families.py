"""22 HF decoder-only families, no hand-written tables: every derived hook equals what an
unpadded single-sequence HF forward computes (output_hidden_states, output_attentions, plain
forward hooks, and the residual stream's algebra), with random norm weights and biases."""
from __future__ import annotations

import fnmatch

import pytest
import torch

import dmi
from dmi.adapters.hf.adapter import HFAdapter
from families import FAMILIES, tiny_family_model

SEQ = [5, 17, 99, 3, 250, 42, 7, 64, 128, 11, 77, 19]
CENTERED = {"gpt2", "phi", "gpt_neox", "gpt_neox_seq", "stablelm", "falcon", "falcon_mq", "falcon_seq", "opt",
            "cohere", "starcoder2"}  # LayerNorm; the rest RMSNorm
PARALLEL = {"phi", "gpt_neox", "falcon", "falcon_mq", "cohere"}
TOL = 1e-4


def _close(name, got, want, tol=TOL):
    assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
    err = (got.float() - want.float()).abs().max().item()
    assert err < tol * max(1.0, want.abs().max().item()), (name, err)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_captures_exactly(family, tmp_path):
    model = tiny_family_model(family)
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2)
    posts, routers = {}, {}
    hs = [layer.register_forward_hook(lambda m, a, o, i=i: posts.__setitem__(i, o[0] if isinstance(o, tuple) else o))
          for i, layer in enumerate(layers)]
    hs += [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: routers.__setitem__(i, o))
           for i, layer in enumerate(layers) if hasattr(getattr(layer, "mlp", None), "gate")
           and not isinstance(layer.mlp.gate, torch.nn.Linear)]
    ids = torch.tensor([SEQ])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, output_attentions=True)
    for h in hs:
        h.remove()
    out = str(tmp_path / "f.h5")
    scores = ["blocks.*.attn.hook_attn_scores"] if family != "deepseek_v3" else []  # MLA: none (see docs)
    bridge = ["blocks.*.hook_in", "blocks.*.hook_out", "blocks.*.attn.hook_out", "blocks.*.ln1.hook_in",
              "blocks.*.ln2.hook_in", "ln_final.hook_out", "embed.hook_out"]
    offered = list(HFAdapter(model).offered())
    bridge = [g for g in bridge if fnmatch.filter(offered, g)]  # (no ln1/ln2 where a model has none)
    with dmi.attach(model, dmi.CaptureSpec(hooks=["all", *scores, *bridge], sink=out)):
        with torch.no_grad():
            model(ids)
    run = dmi.open(out)
    got = {h: run.get(h, "0") for h in run.hooks}
    T = len(SEQ)
    _close("hook_logits", got["hook_logits"], ref.logits[0])
    _close("unembed.hook_in", got["unembed.hook_in"], ref.hidden_states[-1][0])
    _close("ln_final.hook_out", got["ln_final.hook_out"], ref.hidden_states[-1][0])  # nothing between norm and head
    _close("embed.hook_out", got["embed.hook_out"], got["hook_embed"])
    last = posts[len(layers) - 1][0]
    x = last - last.mean(-1, keepdim=True) if family in CENTERED else last
    _close("ln_final", got["ln_final.hook_normalized"] * got["ln_final.hook_scale"], x)
    for i in range(len(layers)):
        b = f"blocks.{i}."
        pre, post = ref.hidden_states[i][0], posts[i][0]
        _close(b + "hook_resid_pre", got[b + "hook_resid_pre"], pre)
        _close(b + "hook_resid_post", got[b + "hook_resid_post"], post)
        attn_out, mlp_out = got[b + "hook_attn_out"], got[b + "hook_mlp_out"]
        _close(b + "hook_in", got[b + "hook_in"], pre)
        _close(b + "hook_out", got[b + "hook_out"], post)
        if b + "ln1.hook_in" in got:
            _close(b + "ln1.hook_in", got[b + "ln1.hook_in"], pre)
        if b + "attn.hook_out" in got:  # the attention module's own output, before what the block adds
            own = got[b + "attn.hook_out"]
            if family in ("gemma2", "gemma3_text", "olmo2"):
                with torch.no_grad():
                    own = layers[i].post_attention_layernorm(own)
            elif family == "granite":
                own = own * model.config.residual_multiplier
            _close(b + "attn.hook_out", own, attn_out)
        if family in PARALLEL:
            assert b + "hook_resid_mid" not in got
            _close(b + "parallel sum", pre + attn_out + mlp_out, post)
            ln2_in = pre
        else:
            mid = got[b + "hook_resid_mid"]
            _close(b + "hook_resid_mid", pre + attn_out, mid)
            _close(b + "mid + mlp_out", mid + mlp_out, post)
            ln2_in = mid
            if b + "ln2.hook_in" in got:
                _close(b + "ln2.hook_in", got[b + "ln2.hook_in"], mid)
        for ln, x in (("ln1", pre), ("ln2", ln2_in)):
            if b + f"{ln}.hook_normalized" in got:
                x = x - x.mean(-1, keepdim=True) if family in CENTERED else x
                _close(b + ln, got[b + f"{ln}.hook_normalized"] * got[b + f"{ln}.hook_scale"], x)
        pattern = ref.attentions[i][0].transpose(0, 1)  # [q, head, k]
        _close(b + "attn.hook_pattern", got[b + "attn.hook_pattern"], pattern)
        if b + "attn.hook_attn_scores" in got:
            s = got[b + "attn.hook_attn_scores"]
            for p in range(T):
                _close(f"{b}scores softmax {p}", s[p, :, : p + 1].softmax(-1), pattern[p, :, : p + 1])
        if i in routers:
            logits, weights, ids_ = routers[i]
            _close(b + "router", got[b + "mlp.hook_router_logits"], logits)
            _close(b + "topk weights", got[b + "mlp.hook_topk_weights"], weights)
            assert torch.equal(got[b + "mlp.hook_topk_ids"], ids_.to(torch.int64))


@pytest.mark.parametrize("family", ["gpt2", "granite", "gemma2", "opt"])
def test_hf_hidden_states_preset_is_output_hidden_states(family, tmp_path):
    """Position embeddings (GPT-2, OPT), an embedding multiplier (Granite) and a scaled embedding
    (Gemma 2) are all in HF's hidden_states[0]; the last entry is the final norm's output."""
    model = tiny_family_model(family)
    ids = torch.tensor([SEQ])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    out = str(tmp_path / "h.h5")
    with dmi.attach(model, dmi.CaptureSpec(hooks=["hf-hidden-states"], sink=out)):
        with torch.no_grad():
            model(ids)
    run = dmi.open(out)
    assert len(run.hooks) == len(hs)
    for name, want in zip(run.hooks, hs):
        _close(name, run.get(name, "0"), want[0])


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "olmo2", "llama"])
def test_q_and_k_equal_the_projections_the_attention_consumes(family, tmp_path):
    """attn.hook_q/hook_k, recomputed by hand from each attention's input with its own
    projections and q/k norms (per head, or over the whole projection as in OLMo 2): every row,
    whichever layout the model norms in (Gemma 3 norms [batch, head, token, dim], Qwen3
    [batch, token, head, dim]). 4 heads and 4 tokens: a layout read the wrong way round
    still has the right shape."""
    model = tiny_family_model(family)
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2)
    inputs = {}
    hs = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, k, i=i: inputs.__setitem__(i, k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
        for i, layer in enumerate(layers)]
    ids = torch.tensor([SEQ[:4]])
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    out = str(tmp_path / "qk.h5")
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.*.attn.hook_q", "blocks.*.attn.hook_k"], sink=out)):
        with torch.no_grad():
            model(ids)
    run = dmi.open(out)
    for i, layer in enumerate(layers):
        attn, h = layer.self_attn, inputs[i]
        for s in "qk":
            proj, norm = getattr(attn, f"{s}_proj"), getattr(attn, f"{s}_norm", None)
            with torch.no_grad():
                x = proj(h)
                D = attn.head_dim
                if norm is not None and norm.weight.numel() != D:
                    x = norm(x).unflatten(-1, (-1, D))
                else:
                    x = x.unflatten(-1, (-1, D))
                    x = norm(x) if norm is not None else x
            assert not run.gaps(f"blocks.{i}.attn.hook_{s}", "0"), (family, s)
            _close(f"blocks.{i}.attn.hook_{s}", run.get(f"blocks.{i}.attn.hook_{s}", "0"), x[0])
