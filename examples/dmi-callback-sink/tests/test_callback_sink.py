from __future__ import annotations

import torch

import dmi
from dmi.testing import run_sink_conformance
from dmi_callback_sink import CallbackSink

received: list = []
gaps_seen: list = []


def collect(rows):
    received.append(rows)


collect.gaps = gaps_seen.append


def _read_back(_):
    out: dict = {}
    for b in received:
        for i, (r, p) in enumerate(zip(b.request, b.position.tolist())):
            out.setdefault(b.hook, {})[(r, p)] = (int(b.step[i]), b.data[i])
    gaps = [(g.hook, r, int(p), int(s), g.reason) for g in gaps_seen for r, p, s in zip(g.request, g.position, g.step)]
    return {"rows": out, "gaps": gaps}


def test_conformance(tmp_path):
    received.clear()
    gaps_seen.clear()
    run_sink_conformance(lambda d: CallbackSink(f"{__name__}:collect"), _read_back, tmp_path)


def test_found_through_its_entry_point_and_streams_real_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    from dmi.tiny import build_tiny_model

    received.clear()
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("qwen3", tmp_path / "m")).eval()
    seen = {}
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("x", o[0].clone()))
    spec = dmi.CaptureSpec(hooks=["blocks.1.hook_resid_post"], sink={"kind": "callback", "target": f"{__name__}:collect"})
    with dmi.attach(model, spec):
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5, 6]]))
    h.remove()
    rows = torch.cat([b.data for b in received])
    assert [b.hook for b in received] == ["blocks.1.hook_resid_post"]
    assert torch.equal(rows, seen["x"])


def test_bad_target_is_refused_at_attach(tmp_path):
    from transformers import AutoModelForCausalLM

    from dmi.tiny import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("qwen3", tmp_path / "m")).eval()
    import pytest

    with pytest.raises(ValueError, match="sink.target"):
        dmi.attach(model, {"sink": {"kind": "callback", "target": "no.such.module:fn"}})
