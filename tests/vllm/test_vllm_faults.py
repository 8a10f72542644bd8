"""vLLM engines that die: at their first request, or before they finish starting. The run they
leave is marked incomplete and says why; it never reads as a complete run that saw no requests.

In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) for speed: the worker's step wrapper and
the armed session's start-up mark are the same code in a multiprocess engine, where the worker
closes its session at shutdown or exit instead of the test."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from vllm_util import env, generate, make_llm, shutdown

import dmi
from dmi.session import _close_open_sessions
from dmi.tiny import build_tiny_model

pytestmark = pytest.mark.vllm

HOOKS = ["blocks.*.hook_resid_post"]


def test_an_engine_that_fails_at_its_first_request_leaves_an_incomplete_file(tmp_path):
    # head_dim 16: the engine starts, and the CPU attention refuses it at the first forward.
    model = build_tiny_model("qwen3", tmp_path / "hd16", head_dim=16)
    out = str(tmp_path / "first.h5")
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        llm = make_llm(model)
    try:
        s = dmi.attach(llm, dmi.CaptureSpec(hooks=HOOKS, sink=out))
        with pytest.raises(Exception, match="head_dim"):
            generate(llm)
        s.close()
    finally:
        shutdown(llm)
    with dmi.open(out) as run:
        assert not run.complete
        assert any("head_dim" in e and "engine raised" in e for e in run.stats["errors"]), run.stats["errors"]


def test_an_armed_engine_that_dies_while_starting_leaves_an_incomplete_file(tiny_dirs, tmp_path):
    out = str(tmp_path / "startup.h5")
    spec = {"hooks": HOOKS, "sink": out}
    # Armed at model load; 1 KiB of KV cache fails the start-up after the session opened.
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0), pytest.raises(Exception, match="memory"):
        make_llm(tiny_dirs["qwen3"], additional_config={"dmi": spec}, kv_cache_memory_bytes=1024)
    _close_open_sessions()   # what the interpreter's exit does with the worker's session
    with dmi.open(out) as run:
        assert not run.complete and run.requests == []
        assert any("before it finished starting" in e for e in run.stats["errors"]), run.stats["errors"]


def test_an_armed_engine_that_starts_and_serves_nothing_is_complete(tiny_dirs, tmp_path):
    # The start-up mark is cleared by the warm-up: a served engine shut down without requests
    # is a complete (empty) run, not a failed one.
    out = str(tmp_path / "idle.h5")
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        llm = make_llm(tiny_dirs["qwen3"], additional_config={"dmi": {"hooks": HOOKS, "sink": out}})
    try:
        dmi.attach(llm).close()
    finally:
        shutdown(llm)
    with dmi.open(out) as run:
        assert run.complete and run.stats["errors"] == []
