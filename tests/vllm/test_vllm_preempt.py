"""A KV cache too small for the batch: vLLM preempts a request and later recomputes it from
scratch. Its positions are on file once each, with the values an unpadded forward gives."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance
from vllm_util import check_outputs, env, generate, make_llm, shutdown

import dmi

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def small(tiny_dirs):
    # 2 usable blocks (of 3; one is vLLM's null block) of 128 tokens (2 layers x k,v x 2 heads x 32 dims x 4 bytes = 1 KiB a token):
    # two requests that each outgrow one block cannot both stay.
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        engine = make_llm(tiny_dirs["llama"], max_model_len=256, kv_cache_memory_bytes=3 * 128 * 1024,
                          enable_prefix_caching=False)
    yield engine
    shutdown(engine)


def test_preempted_requests_are_recorded_once(small, load, out):
    sched = small.llm_engine.engine_core.engine_core.scheduler
    preempted = []
    original = sched._preempt_request

    def counting(request, *a, **k):
        preempted.append(request.request_id)
        return original(request, *a, **k)

    sched._preempt_request = counting
    prompts = [[(3 * i + j) % 250 + 1 for i in range(100 + 10 * j)] for j in range(2)]
    try:
        with dmi.attach(small, dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post", "hook_logits",
                                                      "blocks.0.attn.hook_v"], sink=out)):
            outs = generate(small, prompts, [60, 60])
    finally:
        del sched._preempt_request
    assert preempted, "the engine preempted nothing; the test needs a preemption"
    run = dmi.open(out)
    assert_books_balance(run.stats)
    check_outputs(run, load("llama"), outs)
