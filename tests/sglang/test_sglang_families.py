"""The SGLang architecture tables of the other families: every hook they offer, per request,
equals the HF reference on the same weights (Qwen3 and Llama are covered by the other modules)."""
from __future__ import annotations

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import start_engine

import dmi

pytestmark = pytest.mark.sglang

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33]]


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_family_matches_reference(family, sgl_tiny, hf_model, tmp_path):
    engine = start_engine(sgl_tiny(family), disable_radix_cache=True)
    out = str(tmp_path / "cap.h5")
    try:
        with dmi.attach(engine, {"hooks": ["all"], "sink": out}):
            outs = engine.generate(input_ids=PROMPTS, sampling_params=[
                {"temperature": 0, "ignore_eos": True, "max_new_tokens": m} for m in (3, 5, 2)])
    finally:
        engine.shutdown()
    run = dmi.open(out)
    assert_books_balance(run.stats)
    if family == "qwen3_moe":
        assert {"blocks.0.mlp.hook_router_logits", "blocks.1.mlp.hook_topk_ids"} <= set(run.hooks)
    model = hf_model(family)
    for p, o in zip(PROMPTS, outs):
        assert_request_matches(run, model, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)
