"""Phi-3, Mixtral, Gemma 2, Gemma 3 and Granite on SGLang: every hook the table offers, per
request, equals the HF reference on the same weights, with random norm weights (SGLang's fused
add-norms), Gemma's sandwich norms, embedding scale and soft-caps, and Granite's multipliers."""
from __future__ import annotations

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import start_engine

import dmi

pytestmark = pytest.mark.sglang

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]
FAMILIES = {
    "phi3": {"attn.hook_q", "attn.hook_z", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"},
    "mixtral": {"mlp.hook_router_logits", "mlp.hook_topk_ids", "mlp.hook_topk_weights"},
    "gemma2": {"attn.hook_q", "hook_attn_out", "mlp.hook_pre", "mlp.hook_post"},
    "gemma3_text": {"attn.hook_q", "attn.hook_k", "hook_attn_out"},
    "granite": {"hook_attn_out", "hook_mlp_out", "mlp.hook_pre_linear", "mlp.hook_post"},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_reference(family, tmp_path):
    import torch
    from families import save_family_model
    from transformers import AutoModelForCausalLM

    extra = {"tie_word_embeddings": True} if family.startswith("gemma") else {}
    if family == "gemma2":  # SGLang 0.5.23's Gemma 2 reads hidden_act, which transformers 5 names hidden_activation
        extra["hidden_act"] = "gelu_pytorch_tanh"
    path = save_family_model(family, tmp_path / family, **extra)
    out = str(tmp_path / "cap.h5")
    engine = start_engine(path, disable_radix_cache=True)
    try:
        with dmi.attach(engine, {"hooks": ["all"], "sink": out}):
            outs = engine.generate(input_ids=PROMPTS, sampling_params=[
                {"temperature": 0, "ignore_eos": True, "max_new_tokens": m} for m in (3, 2)])
    finally:
        engine.shutdown()
    run = dmi.open(out)
    for layer in (0, 1):
        assert {f"blocks.{layer}.{s}" for s in FAMILIES[family] | {"hook_resid_mid", "hook_mlp_out"}} <= set(run.hooks)
    assert {"hook_embed", "ln_final.hook_out", "hook_logits"} <= set(run.hooks)
    assert_books_balance(run.stats)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    for p, o in zip(PROMPTS, outs):
        assert_request_matches(run, hf, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)
    run.close()
