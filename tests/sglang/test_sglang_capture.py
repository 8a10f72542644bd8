"""dmi.attach on a running sglang.Engine (CPU): captured rows equal the HF reference per
request, under continuous batching, chunked prefill and the radix cache; bad input leaves the
engine serving. One engine for the module."""
from __future__ import annotations

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import start_engine

import dmi
from dmi.errors import (
    RingTooSmallError,
    SessionStateError,
    SinkPathError,
    UnknownHookError,
)

pytestmark = pytest.mark.sglang

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def engine(sgl_tiny):
    # Two running requests at most and 16-token prefill chunks: five requests need several
    # batches, a 20-token prompt is prefilled in two chunks, and decodes mix with prefills.
    # DMI_STRICT: the scheduler records any per-hook host work inside a step (dmi/strict.py).
    mp = pytest.MonkeyPatch()
    mp.setenv("DMI_STRICT", "1")
    try:
        e = start_engine(sgl_tiny("qwen3"), max_running_requests=2, chunked_prefill_size=16, enable_mixed_chunk=True)
    finally:
        mp.undo()
    yield e
    e.shutdown()


def _prompt(first: int, n: int) -> list[int]:
    """Distinct first tokens per prompt, so no prompt shares a radix-cache prefix by accident."""
    return [first] + [(first * 7 + 3 * i) % 250 + 1 for i in range(1, n)]


def test_ragged_requests_match_reference(engine, hf_model, tmp_path):
    prompts = [_prompt(100 + i, n) for i, n in enumerate([5, 9, 3, 20, 7])]
    new = [4, 2, 6, 3, 5]
    params = [{**GREEDY, "max_new_tokens": m, "ignore_eos": True} for m in new]
    out = str(tmp_path / "cap.h5")
    with dmi.attach(engine, dmi.CaptureSpec(hooks=["all"], sink=out)) as s:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        live = s.stats()
    assert live["rows"]["produced"] > 0
    assert live["strict"] == [], live["strict"]
    run = dmi.open(out)
    rids = [o["meta_info"]["id"] for o in outs]
    assert sorted(run.requests) == sorted(rids)
    assert run.stats["rows"]["dropped"] == 0 and not run.stats["not_computed"]
    assert_books_balance(run.stats)
    model = hf_model("qwen3")
    assert "blocks.1.attn.hook_q" in run.hooks and "hook_logits" in run.hooks
    for p, o, m in zip(prompts, outs, new):
        assert len(o["output_ids"]) == m
        assert_request_matches(run, model, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)
    # the 20-token prompt was prefilled in two chunks: its logits hold the first chunk's last row too
    assert min(run.positions("hook_logits", rids[3]).tolist()) < len(prompts[3]) - 1


def test_radix_cache_hits_are_recorded_not_computed(engine, hf_model, tmp_path):
    prefix = _prompt(200, 24)
    engine.generate(input_ids=[prefix + [7]], sampling_params={**GREEDY, "max_new_tokens": 1})  # fills the cache
    prompt = prefix + [9, 11]
    out = str(tmp_path / "cap.h5")
    hooks = ["blocks.*.hook_resid_post", "hook_logits", "blocks.0.attn.hook_k"]
    with dmi.attach(engine, dmi.CaptureSpec(hooks=hooks, sink=out)):
        o = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 3, "ignore_eos": True})
    cached = o["meta_info"]["cached_tokens"]
    assert cached >= 16, o["meta_info"]  # the radix cache served most of the prefix
    rid = o["meta_info"]["id"]
    run = dmi.open(out)
    gaps = run.gaps(request=rid)
    # A logits row exists only from the prompt's last position on, which the engine always
    # computes: a cache hit is a gap of the token hooks only (as on vLLM).
    for hook in run.hooks:
        got = sorted(g["position"] for g in gaps if g["hook"] == hook)
        want = [] if hook == "hook_logits" else list(range(cached))
        assert got == want, f"{hook}: not-computed positions {got}"
    assert {g["reason"] for g in gaps} == {"prefix_cache"}
    assert run.stats["not_computed"] == {"prefix_cache": cached * (len(run.hooks) - 1)}
    assert_request_matches(run, hf_model("qwen3"), rid, fed(prompt, o), run.hooks, logits_from=len(prompt) - 1,
                           computed_from=cached)


@pytest.mark.parametrize("spec, error, words", [
    ({"hooks": ["blocks.0.hook_resid_psot"]}, UnknownHookError, ["closest", "blocks.0.hook_resid_post"]),
    ({"hooks": ["blocks.7.hook_resid_post"]}, UnknownHookError, ["out of range", "2 layers"]),
    ({"hooks": ["blocks.0.attn.hook_pattern"]}, UnknownHookError, ["does not offer"]),
    ({"hooks": ["module:model.layers.0.mlp"]}, UnknownHookError, ["not offered on SGLang", "preset"]),
    ({"hooks": ["resid"], "sink": "/nonexistent-dir/x/cap.h5"}, SinkPathError, ["sink"]),
    ({"hooks": ["hook_logits"], "ring": {"bytes": 1024}}, RingTooSmallError, ["ring.bytes"]),
])
def test_bad_input_is_refused_and_engine_keeps_serving(engine, spec, error, words, tmp_path):
    spec = {"sink": str(tmp_path / "cap.h5"), **spec}
    before = engine.generate(input_ids=[31, 32, 33], sampling_params={**GREEDY, "max_new_tokens": 3})
    with pytest.raises(error) as e:
        dmi.attach(engine, spec)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "cap.h5").exists()
    after = engine.generate(input_ids=[31, 32, 33], sampling_params={**GREEDY, "max_new_tokens": 3})
    assert after["output_ids"] == before["output_ids"]
    # nothing was left open in the scheduler: a good attach works at once
    with dmi.attach(engine, {"hooks": ["hook_logits"], "sink": str(tmp_path / "ok.h5")}):
        pass


def test_one_session_at_a_time_and_capture_changes_nothing(engine, tmp_path):
    p = _prompt(150, 6)
    plain = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 5})
    out = str(tmp_path / "a.h5")
    with dmi.attach(engine, {"hooks": ["all"], "sink": out}) as s:
        with pytest.raises(SessionStateError, match="already"):
            dmi.attach(engine, {"hooks": ["hook_logits"], "sink": str(tmp_path / "b.h5")})
        captured = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 5})
        s.flush()
    assert captured["output_ids"] == plain["output_ids"]
    final = s.stats()
    assert final["rows"]["in_flight"] == 0 and final["rows"]["written"] == final["rows"]["produced"]
