"""vLLM with torch.compile, armed at construction (additional_config={"dmi": spec}): the
capture points are installed after the model loads and before vLLM compiles it, so they
are graph nodes that run every step (checked by value, step after step)."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance
from vllm_util import PROMPTS, check_outputs, env, fed, generate, make_llm, shutdown

import dmi
from dmi.errors import EngineNotSupportedError, SpecError

pytestmark = pytest.mark.vllm

HOOKS = ["blocks.*.hook_resid_post", "hook_logits", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k",
         "blocks.1.attn.hook_v"]


@pytest.fixture(scope="module")
def armed(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    sink = str(root / "armed.h5")
    # A fresh compile cache: the test must see this code's graph, not one compiled before.
    # DMI_STRICT: the worker records any dmi Python inside the compiled forward (dmi/strict.py).
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=1, VLLM_CACHE_ROOT=str(root / "vllm-cache"), DMI_STRICT="1"):
        engine = make_llm(tiny_dirs["qwen3"], enforce_eager=False,
                          additional_config={"dmi": {"hooks": HOOKS, "sink": sink}})
    yield engine, sink
    shutdown(engine)


def test_compiled_armed_capture_matches_reference(armed, load):
    llm, sink = armed
    with dmi.attach(llm) as s:
        assert s.armed
        outs = generate(llm)
        stats = s.stats()
    assert stats["strict"] == [], stats["strict"]  # no dmi Python ran inside the compiled graph
    run = dmi.open(sink)
    assert run.complete and run.stats["rows"]["dropped"] == 0
    assert_books_balance(run.stats)
    check_outputs(run, load("qwen3"), outs)


def test_compiled_refusals_leave_the_engine_serving(armed, monkeypatch, tmp_path):
    llm, _ = armed
    with pytest.raises(SpecError, match="armed at construction"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["hook_logits"], sink=str(tmp_path / "x.h5")))
    # The same engine as the caller sees one compiled without a dmi spec: attaching now is refused.
    cfg = llm.llm_engine.vllm_config.additional_config
    monkeypatch.setitem(cfg, "dmi", None)
    monkeypatch.delitem(cfg, "dmi")
    with pytest.raises(EngineNotSupportedError, match="additional_config"):
        dmi.attach(llm, dmi.CaptureSpec(hooks=["hook_logits"], sink=str(tmp_path / "y.h5")))
    monkeypatch.undo()
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()
    outs = generate(llm, PROMPTS[:2], [3, 3])
    assert [len(fed(o)) for o in outs] == [len(PROMPTS[0]) + 2, len(PROMPTS[1]) + 2]
