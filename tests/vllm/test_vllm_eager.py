"""vLLM in-process, eager: captured rows equal an unpadded single-sequence HF forward."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance, assert_matches
from vllm_util import (
    MAX_TOKENS,
    PROMPTS,
    check_outputs,
    env,
    fed,
    generate,
    make_llm,
    shutdown,
)

import dmi
from dmi.errors import EngineNotSupportedError, SpecError, UnknownHookError

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        engine = make_llm(tiny_dirs["qwen3"])
    yield engine
    shutdown(engine)


def test_ragged_continuous_batch_matches_reference(llm, load, out):
    # max_num_seqs=2 < 5 requests with different lengths: requests join and leave the batch.
    with dmi.attach(llm, dmi.CaptureSpec(hooks=["all"], sink=out)) as s:
        outs = generate(llm)
        live = s.stats()
    assert live["hooks"]["hook_logits"]["produced"] == sum(MAX_TOKENS)
    run = dmi.open(out)
    assert "blocks.0.attn.hook_q" in run.hooks and "hook_embed" in run.hooks and "blocks.1.mlp.hook_post" in run.hooks
    assert run.stats["rows"]["dropped"] == 0
    assert_books_balance(run.stats)
    assert [len(o.outputs[0].token_ids) for o in outs] == MAX_TOKENS
    check_outputs(run, load("qwen3"), outs)


def test_request_ids_are_the_users(llm, out):
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, detokenize=False)
    with dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.1.hook_resid_post"], sink=out)):
        llm.llm_engine.add_request("user-req-7", TokensPrompt(prompt_token_ids=[5, 6, 7]), params)
        done = []
        while llm.llm_engine.has_unfinished_requests():
            done += [o for o in llm.llm_engine.step() if o.finished]
    assert [o.request_id for o in done] == ["user-req-7"]
    run = dmi.open(out)
    assert run.requests == ["user-req-7"]
    assert run.positions("blocks.1.hook_resid_post", "user-req-7").tolist() == [0, 1, 2, 3]


def test_prefix_cache_hits_are_recorded_as_not_computed(llm, load, out):
    block = llm.llm_engine.vllm_config.cache_config.block_size
    shared = [(7 * i) % 250 + 3 for i in range(block)]
    first, second = shared + [90, 91, 92], shared + [93, 94]
    hooks = ["blocks.*.hook_resid_post", "hook_logits"]
    with dmi.attach(llm, dmi.CaptureSpec(hooks=hooks, sink=out)) as s:
        a = generate(llm, [first], [2])[0]
        b = generate(llm, [second], [3])[0]
        stats = s.stats()
    run = dmi.open(out)
    cached = b.num_cached_tokens
    assert cached >= block, "the engine served no prefix from its cache; the test needs a hit"
    # every token hook, but not hook_logits: a cached prompt position never has a logits row
    token_hooks = [h for h in run.hooks if h != "hook_logits"]
    assert stats["not_computed"] == {"prefix_cache": cached * len(token_hooks)}
    assert not run.gaps("hook_logits", b.request_id)
    gaps = run.gaps("blocks.0.hook_resid_post", b.request_id)
    assert sorted(g["position"] for g in gaps) == list(range(cached))
    assert {g["reason"] for g in gaps} == {"prefix_cache"}
    assert not run.gaps("blocks.0.hook_resid_post", a.request_id)
    hf = load("qwen3")
    seq = fed(b)
    pos = run.positions("blocks.1.hook_resid_post", b.request_id)
    assert pos.tolist() == list(range(cached, len(seq)))
    assert_matches(run, hf, a.request_id, fed(a), run.hooks, logits_from=len(first) - 1)
    from reference import reference

    ref = reference(hf, seq)
    for hook in ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]:
        got = run.get(hook, b.request_id)
        assert (got - ref[hook][pos]).abs().max() < 1e-4


def test_bad_input_is_refused_before_the_engine_and_it_keeps_serving(llm, out, tmp_path):
    with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_post"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_pots"], sink=out))
    with pytest.raises(UnknownHookError, match="layer 9 is out of range"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.9.hook_resid_post"], sink=out))
    with pytest.raises(UnknownHookError, match="attn.hook_pattern"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.0.attn.hook_pattern"], sink=out))
    with pytest.raises(SpecError, match="module hooks are not supported"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["module:model.layers.0"], sink=out))
    with pytest.raises(SpecError, match="ring.bytes"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["hook_logits"], ring={"bytes": 64}, sink=out))
    import os

    assert not os.path.exists(out)
    # Nothing was armed: a session opens now, and the engine generates what it did before.
    with dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=out)) as s:
        with pytest.raises(Exception, match="already has an open dmi session"):
            dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(tmp_path / "b.h5")))
        outs = generate(llm, PROMPTS[:2], [3, 3])
    assert s.stats()["hooks"]["blocks.0.hook_resid_post"]["written"] == sum(len(fed(o)) for o in outs)
    plain = generate(llm, PROMPTS[:2], [3, 3])
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs]


def test_engine_not_supported_names_versions(llm, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(EngineNotSupportedError, match=r"supports vLLM 0\.32"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"]))
    monkeypatch.undo()
    par = llm.llm_engine.vllm_config.parallel_config
    monkeypatch.setattr(par, "pipeline_parallel_size", 2)
    with pytest.raises(EngineNotSupportedError, match="pipeline_parallel_size=2"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"]))
