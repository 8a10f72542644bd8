"""Phi-3, Mixtral, Gemma 2, Gemma 3 and Granite on vLLM (in-process, eager): every hook the table
offers, per request, equals the HF reference on the same weights, with random norm weights (so
vLLM's fused add-norms are checked), Gemma's sandwich norms, embedding normaliser and soft-caps,
and Granite's multipliers."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from families import save_family_model
from helpers import assert_books_balance
from vllm_util import check_outputs, env, generate, make_llm, shutdown

import dmi

pytestmark = pytest.mark.vllm

# (family, hooks every layer must offer beyond the residual stream)
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
    from transformers import AutoModelForCausalLM

    # vLLM's Gemma has no separate LM head: it unembeds with the embedding matrix.
    tied = {"tie_word_embeddings": True} if family.startswith("gemma") else {}
    path = save_family_model(family, tmp_path / family, **tied)
    out = str(tmp_path / "cap.h5")
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        engine = make_llm(path)
    try:
        with dmi.attach(engine, dmi.CaptureSpec(hooks=["all"], sink=out)):
            outs = generate(engine)
    finally:
        shutdown(engine)
    run = dmi.open(out)
    for layer in (0, 1):
        assert {f"blocks.{layer}.{s}" for s in FAMILIES[family] | {"hook_resid_mid", "hook_mlp_out"}} <= set(run.hooks)
    assert {"hook_embed", "ln_final.hook_out", "hook_logits"} <= set(run.hooks)
    assert_books_balance(run.stats)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    check_outputs(run, hf, outs)
    run.close()
