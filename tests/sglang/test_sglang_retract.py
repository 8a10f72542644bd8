"""A request SGLang retracts (its KV cache pool ran out mid-decode) and recomputes later is
recorded once, with values equal to the HF reference.

The pool holds 100 tokens and four requests want ~60 each; a tiny initial new-token ratio
makes the scheduler admit them together, so decoding runs out of room and retracts one.
"""
from __future__ import annotations

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import start_engine

import dmi

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def engine(sgl_tiny):
    # Read by the scheduler process SGLang spawns, so set before the engine starts.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGLANG_INIT_NEW_TOKEN_RATIO", "0.01")
        mp.setenv("SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR", "1")
        e = start_engine(sgl_tiny("qwen3"), max_total_tokens=100, max_running_requests=4)
    yield e
    e.shutdown()


def test_retracted_request_is_recorded_once(engine, hf_model, tmp_path):
    prompts = [[100 + i] + [(i * 7 + 3 * k) % 250 + 1 for k in range(1, 20)] for i in range(4)]
    # No ignore_eos: SGLang reserves a request's whole max_new_tokens when it ignores EOS, and
    # would never over-admit. An early EOS would only shorten a request (fed() follows the output).
    params = {"temperature": 0, "max_new_tokens": 40}
    out = str(tmp_path / "cap.h5")
    hooks = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_v", "hook_logits"]
    with dmi.attach(engine, dmi.CaptureSpec(hooks=hooks, sink=out)):
        outs = engine.generate(input_ids=prompts, sampling_params=params)
    retracted = [o for o in outs if o["meta_info"]["num_retractions"] > 0]
    assert retracted, "the scheduler retracted no request; the test's premise failed"
    run = dmi.open(out)
    assert_books_balance(run.stats)
    model = hf_model("qwen3")
    for p, o in zip(prompts, outs):
        # Positions exactly 0..len-1 (none twice) for the token hooks; logits unique.
        assert_request_matches(run, model, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)
