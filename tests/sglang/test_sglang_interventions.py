"""Interventions on SGLang (CPU, eager: SGLang's graphs need a GPU): a steered request
generates what HF generates with the same edit as a plain hook on that request alone, its
downstream rows within 1e-4; requests of the same continuous batch that no intervention
selects are bit-identical to a run without interventions. Positions the radix cache serves
are never computed, so never edited: they are booked as failed, never silently unsteered."""
from __future__ import annotations

import pytest
from sglang_env import start_engine

import dmi
from edit_oracle import DOWN, NEW, REQUESTS, check, interventions

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def engine(sgl_tiny):
    mp = pytest.MonkeyPatch()
    mp.setenv("DMI_STRICT", "1")
    try:
        e = start_engine(sgl_tiny("qwen3"), max_running_requests=2)
    finally:
        mp.undo()
    yield e
    e.shutdown()


def serve(engine, requests=REQUESTS) -> dict[str, list[int]]:
    params = [{"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True} for _ in requests]
    outs = engine.generate(input_ids=list(requests.values()), sampling_params=params, rid=list(requests))
    return {o["meta_info"]["id"]: list(o["output_ids"]) for o in outs}


def test_steers_each_request_like_the_oracle(engine, hf_model, tmp_path):
    engine.flush_cache()
    with dmi.attach(engine, {"hooks": [DOWN], "sink": str(tmp_path / "plain.h5")}):
        plain_got = serve(engine)
    engine.flush_cache()  # else the radix cache serves the prompts unedited (next test)
    with dmi.attach(engine, {"hooks": [DOWN], "sink": str(tmp_path / "steer.h5"),
                             "interventions": interventions()}) as s:
        got = serve(engine)
        stats = s.stats()
    assert stats["strict"] == [], stats["strict"]
    check(dmi.open(tmp_path / "steer.h5"), stats["interventions"], got, dmi.open(tmp_path / "plain.h5"), plain_got,
          hf_model("qwen3"))


def test_cached_positions_are_booked_not_edited(engine, tmp_path):
    long = {"e": list(range(60, 100))}  # 40 tokens: the second run finds most of them cached
    engine.flush_cache()
    serve(engine, long)
    iv = {"hook": "blocks.0.hook_resid_post", "op": "zero", "requests": {"ids": ["e"]}, "name": "z"}
    with dmi.attach(engine, {"hooks": [DOWN], "sink": str(tmp_path / "c.h5"), "interventions": [iv]}) as s:
        serve(engine, long)
        stats = s.stats()
    books = stats["interventions"]["z"]
    (reason, failed), = books["failed"].items()
    cached = failed["e"]
    assert cached[0][0] == 0 and books["failed_rows"] == cached[0][1] > 0
    assert books["requests"] == {"e": [[cached[0][1], 40 + NEW - 1]]}
    assert any("not computed" in e for e in stats["errors"])


def test_bad_intervention_is_refused_before_the_scheduler(engine, tmp_path):
    with pytest.raises(dmi.SpecError) as e:
        dmi.attach(engine, {"hooks": [DOWN], "sink": str(tmp_path / "x.h5"),
                            "interventions": [{"hook": "blocks.0.attn.hook_v", "op": "zero"}]})
    assert e.value.field == "interventions[0].hook" and "fused" in str(e.value)
    with pytest.raises(dmi.SpecError) as e:
        dmi.attach(engine, {"hooks": ["blocks.0.hook_resid_post"], "sink": str(tmp_path / "x.h5"),
                            "interventions": [{"hook": "blocks.0.hook_resid_post", "op": "zero",
                                               "capture": "before"}]})
    assert e.value.field == "interventions[0].capture"
    assert not (tmp_path / "x.h5").exists()
