"""Arming at construction (DMI_SPEC): the scheduler opens the session after the model loads
and before CUDA graphs would be captured; dmi.attach(engine) with no spec binds to it."""
from __future__ import annotations

import json
import os

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import require_sglang, start_engine

import dmi
from dmi.errors import SessionStateError, SinkPathError, UnknownHookError

pytestmark = pytest.mark.sglang

GREEDY = {"temperature": 0, "ignore_eos": True}
HOOKS = ["blocks.*.hook_resid_post", "hook_logits", "blocks.*.attn.hook_k", "blocks.0.attn.hook_z",
         "ln_final.hook_out"]


def test_bad_spec_in_the_environment_fails_where_the_engine_is_constructed(sgl_tiny, monkeypatch):
    require_sglang()
    monkeypatch.setenv("DMI_SPEC", json.dumps({"hooks": ["blocks.0.hook_resid_psot"]}))
    with pytest.raises(UnknownHookError, match="closest: blocks.0.hook_resid_post"):
        start_engine(sgl_tiny("llama"))


def test_an_existing_run_at_the_sink_stops_the_engine_where_it_is_constructed(sgl_tiny, monkeypatch, tmp_path):
    require_sglang()
    out = tmp_path / "earlier.h5"
    out.write_bytes(b"an earlier run")
    monkeypatch.setenv("DMI_SPEC", json.dumps({"hooks": HOOKS, "sink": str(out)}))
    with pytest.raises(SinkPathError, match="earlier.h5"):
        start_engine(sgl_tiny("llama"))
    assert out.read_bytes() == b"an earlier run"


@pytest.fixture(scope="module")
def armed(sgl_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("armed") / "armed.h5"
    os.environ["DMI_SPEC"] = json.dumps({"hooks": HOOKS, "sink": str(out)})
    try:
        e = start_engine(sgl_tiny("llama"), disable_radix_cache=True, max_running_requests=2)
    finally:
        os.environ.pop("DMI_SPEC", None)
    yield e, str(out)
    e.shutdown()


def test_armed_engine_captures_from_the_start_and_attach_binds(armed, hf_model):
    engine, out = armed
    first = [[41, 42, 43, 44], [51, 52, 53, 54, 55, 56, 57]]
    outs = engine.generate(input_ids=first, sampling_params={**GREEDY, "max_new_tokens": 3})
    with pytest.raises(SessionStateError, match="armed at construction"):
        dmi.attach(engine, {"hooks": ["hook_logits"], "sink": out + ".other.h5"})
    with dmi.attach(engine) as s:
        assert s.spec.hooks == HOOKS
        later = [[61, 62], [71, 72, 73, 74, 75], [81, 82, 83]]
        outs += engine.generate(input_ids=later, sampling_params=[{**GREEDY, "max_new_tokens": m} for m in (5, 2, 4)])
    run = dmi.open(out)
    assert sorted(run.requests) == sorted(o["meta_info"]["id"] for o in outs)
    assert_books_balance(run.stats)
    model = hf_model("llama")
    for p, o in zip(first + later, outs):
        assert_request_matches(run, model, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)


def test_after_the_armed_session_closes_a_new_attach_works(armed, hf_model, tmp_path):
    engine, _ = armed
    out = str(tmp_path / "again.h5")
    with dmi.attach(engine, {"hooks": ["blocks.1.hook_resid_post"], "sink": out}):
        o = engine.generate(input_ids=[91, 92, 93], sampling_params={**GREEDY, "max_new_tokens": 2})
    run = dmi.open(out)
    assert run.requests == [o["meta_info"]["id"]]
    assert_request_matches(run, hf_model("llama"), run.requests[0], fed([91, 92, 93], o), run.hooks, logits_from=2)
