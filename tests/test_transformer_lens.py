"""Every TransformerLens name dmi offers holds TransformerLens's own value: HookedTransformer 3.x,
weights converted by its own functions without processing (no folding or centering), random
norm weights and biases, on tiny GPT-2, Llama and GPT-NeoX (parallel blocks, partial rotary) models."""
from __future__ import annotations

import pytest
import torch

import dmi
from dmi.adapters.hf.adapter import HFAdapter
from dmi.tiny import tiny_config

tl = pytest.importorskip("transformer_lens", reason="TransformerLens is the `tl` extra")
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained import weight_conversions as wc  # noqa: E402

SEQ = [5, 17, 99, 3, 250, 42, 7, 64, 128, 11]


def _hf(family):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = (GPTNeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=128, hidden_act="gelu")
           if family == "gpt_neox" else tiny_config(family))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0) if p.dim() >= 2 else None
        for name, mod in model.named_modules():  # norms off their defaults of 1 and 0
            if "norm" in type(mod).__name__.lower():
                mod.weight.copy_(1 + 0.5 * torch.randn_like(mod.weight))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.5 * torch.randn_like(mod.bias))
    return model


def _tl(family, hf):
    c = hf.config
    if family == "gpt2":
        cfg = HookedTransformerConfig(d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                      d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                      normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False,
                                      original_architecture="GPT2LMHeadModel")
        sd = wc.convert_gpt2_weights(hf, cfg)
    elif family == "gpt_neox":  # parallel attention and MLP, partial rotary, LayerNorm
        d_head = c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                                      d_head=d_head, d_mlp=c.intermediate_size, d_vocab=c.vocab_size,
                                      n_ctx=c.max_position_embeddings, act_fn="gelu", normalization_type="LN",
                                      eps=c.layer_norm_eps, positional_embedding_type="rotary",
                                      rotary_dim=int(d_head * c.rope_parameters.get("partial_rotary_factor", 1.0)), rotary_base=c.rope_parameters["rope_theta"],
                                      parallel_attn_mlp=True, default_prepend_bos=False,
                                      original_architecture="GPTNeoXForCausalLM")
        sd = wc.convert_neox_weights(hf, cfg)
    else:
        cfg = HookedTransformerConfig(d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                                      d_head=c.head_dim, n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size,
                                      d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings, act_fn="silu",
                                      normalization_type="RMS", eps=c.rms_norm_eps, positional_embedding_type="rotary",
                                      rotary_dim=c.head_dim, rotary_base=c.rope_parameters["rope_theta"], gated_mlp=True,
                                      final_rms=True, default_prepend_bos=False, original_architecture="LlamaForCausalLM")
        sd = wc.convert_llama_weights(hf, cfg)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_every_transformer_lens_name_equals_transformer_lens(family, tmp_path):
    hf = _hf(family)
    tlm = _tl(family, hf)
    ids = torch.tensor([SEQ])
    with torch.no_grad():
        logits, cache = tlm.run_with_cache(ids)
    assert (logits - hf(ids).logits).abs().max() < 1e-4  # the conversion itself is exact
    ours = HFAdapter(hf).offered()
    names = [n for n in ours if n in cache or n == "unembed.hook_out"]
    recomputed = [n for n in names if ours[n][0].fn is not None]
    must = {"ln_final.hook_normalized", "ln_final.hook_scale", "blocks.1.ln1.hook_scale", "blocks.1.ln2.hook_normalized",
            "blocks.1.attn.hook_attn_scores", "blocks.1.mlp.hook_pre", "blocks.0.hook_resid_mid", "hook_embed"}
    if family == "gpt2":
        must |= {"hook_pos_embed"}
    else:
        must |= {"blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k"}
    if family == "llama":
        must |= {"blocks.1.mlp.hook_pre_linear"}
    if family == "gpt_neox":
        must -= {"blocks.0.hook_resid_mid"}  # parallel blocks have none, in TransformerLens too
    assert must <= set(names), sorted(must - set(names))
    out = str(tmp_path / "tl.h5")
    with dmi.attach(hf, dmi.CaptureSpec(hooks=["all", *recomputed, "unembed.hook_out"], sink=out)):
        with torch.no_grad():
            hf(ids)
    run = dmi.open(out)
    T = len(SEQ)
    for name in names:
        got = run.get(name, "0")
        want = logits[0] if name == "unembed.hook_out" else cache[name][0]
        if name.endswith(("hook_attn_scores", "hook_pattern")):  # TL: [head, q, k]; dmi row p: [head, keys 0..p]
            for p in range(T):
                assert torch.allclose(got[p, :, : p + 1], want[:, p, : p + 1], atol=1e-4), (name, p)
                assert torch.isinf(want[:, p, p + 1:]).all() or name.endswith("pattern")  # TL masks with -inf
            continue
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        err = (got - want).abs().max().item()
        assert err < 1e-4, (name, err)


def test_recomputed_hooks_in_a_padded_generate_equal_the_unpadded_forward(tmp_path):
    """rot_q/rot_k and scores in generate (left padding, KV cache): row for row what one unpadded
    forward of that request gives, and softmax(scores) is the pattern the model used."""
    from helpers import fed_sequences, left_pad

    hf = _hf("llama")
    prompts, pad = [[11, 12, 13, 14, 15], [21, 22, 23]], 0
    ids, mask = left_pad(prompts, pad)
    hooks = ["blocks.*.attn.hook_rot_q", "blocks.*.attn.hook_rot_k", "blocks.*.attn.hook_attn_scores",
             "blocks.*.attn.hook_pattern"]
    out = str(tmp_path / "gen.h5")
    with dmi.attach(hf, dmi.CaptureSpec(hooks=hooks, sink=out)):
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=pad,
                          eos_token_id=None)
    run = dmi.open(out)
    tlm = _tl("llama", hf)
    for rid, seq in enumerate(fed_sequences(gen, prompts)):
        with torch.no_grad():
            _, cache = tlm.run_with_cache(torch.tensor([seq]))
        T = len(seq)
        assert run.positions("blocks.1.attn.hook_rot_q", str(rid)).tolist() == list(range(T))
        for layer in range(2):
            b = f"blocks.{layer}.attn."
            for h in ("hook_rot_q", "hook_rot_k"):
                assert (run.get(b + h, str(rid)) - cache[b + h][0]).abs().max() < 1e-4, (rid, b + h)
            scores, pattern = run.get(b + "hook_attn_scores", str(rid)), run.get(b + "hook_pattern", str(rid))
            for p in range(T):
                assert torch.allclose(scores[p, :, : p + 1], cache[b + "hook_attn_scores"][0][:, p, : p + 1], atol=1e-4)
                assert torch.allclose(scores[p, :, : p + 1].softmax(-1), pattern[p, :, : p + 1], atol=1e-5)
