"""vLLM in its default multiprocess mode: capture runs in the worker process, the caller
steers it through collective_rpc, and leaving the session flushes the worker's file."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance
from vllm_util import MAX_TOKENS, check_outputs, env, generate, make_llm, shutdown

import dmi

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=1):
        engine = make_llm(tiny_dirs["llama"])
    yield engine
    shutdown(engine)


def test_multiprocess_capture_matches_reference(llm, load, out):
    import os

    with dmi.attach(llm, dmi.CaptureSpec(hooks=["all"], sink=out)) as s:
        assert s.stats()["hooks"] == {} or all(c["produced"] == 0 for c in s.stats()["hooks"].values())
        outs = generate(llm)
    # The worker wrote the file in its own process; it is complete once the session is left.
    assert os.getpid() != 0 and os.path.exists(out)
    run = dmi.open(out)
    assert run.complete
    assert s.stats()["hooks"]["hook_logits"]["written"] == sum(MAX_TOKENS)
    assert_books_balance(run.stats)
    check_outputs(run, load("llama"), outs)
