"""Bad input raises a ValueError subclass at attach, naming the field; the model is untouched."""
from __future__ import annotations

import json

import pytest
import torch

import dmi
from dmi.errors import RingTooSmallError, SinkPathError, SpecError, UnknownHookError


def _untouched(model):
    mods = list(model.modules())
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods), sorted(model.__dict__))


@pytest.mark.parametrize("spec, error, words", [
    ({"hooks": ["blocks.0.hook_resid_psot"]}, UnknownHookError, ["blocks.0.hook_resid_post"]),
    ({"hooks": ["blocks.7.hook_resid_post"]}, UnknownHookError, ["layer 7", "2 layers"]),
    ({"hooks": ["blocks.*.mlp.hook_router_logits"]}, UnknownHookError, ["matches no hook"]),
    ({"hooks": ["module:model.layers.0.mlpp"]}, UnknownHookError, ["model.layers.0.mlp"]),
    ({"hooks": ["blocks.0.attn.hook_pattern"]}, SpecError, ["eager"]),
    ({"hooks": ["hook_logits"], "ring": {"bytes": 1000}}, RingTooSmallError, ["ring.bytes", "1344"]),
    ({"tokens": "middle"}, SpecError, ["tokens", "'last'"]),
    ({"requests": {"sample": 1.5}}, SpecError, ["requests.sample"]),
    ({"requests": {"sample": -0.1}}, SpecError, ["requests.sample"]),
    ({"requests": {"ids": []}}, SpecError, ["requests.ids"]),
    ({"steps": {"stride": 0}}, SpecError, ["steps.stride"]),
    ({"overload": "explode"}, SpecError, ["overload", "'block'"]),
    ({"hookz": ["resid"]}, SpecError, ["hookz", "'hooks'"]),
    ({"tokens": {"mode": "all", "positions": []}}, SpecError, ["tokens.positions"]),
    ({"tokens": {"mode": "all", "positions": [[4, 4]]}}, SpecError, ["tokens.positions", "start < stop"]),
    ({"tokens": {"every": 0}}, SpecError, ["tokens.every"]),
    ({"overload": "degrade"}, SpecError, ["overload", "fallback"]),
    ({"overload": "degrade", "degrade": {"fallback": {"hooks": ["hook_logits"]}, "high": 0.2, "low": 0.6}},
     SpecError, ["degrade.low", "out of order"]),
    ({"degrade": {"fallback": {"hooks": ["hook_logits"]}}}, SpecError, ["overload"]),
])
def test_bad_spec_raises_at_attach_and_model_still_works(spec, error, words, load, tmp_path):
    model = load("qwen3", attn="sdpa")
    before = _untouched(model)
    with pytest.raises(error) as e:
        dmi.attach(model, {**spec, "sink": str(tmp_path / "x.h5")})
    assert isinstance(e.value, ValueError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert _untouched(model) == before
    assert not (tmp_path / "x.h5").exists()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    # and a good spec still attaches afterwards
    with dmi.attach(model, {"hooks": ["blocks.0.hook_resid_post"], "sink": str(tmp_path / "ok.h5")}):
        pass


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "read_only"])
def test_unwritable_sink_path(where, load, tmp_path):
    model = load("qwen3")
    path = {"missing_dir": tmp_path / "nope" / "x.h5", "is_dir": tmp_path,
            "read_only": tmp_path / "ro" / "x.h5"}[where]
    if where == "read_only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        import os

        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
    with pytest.raises(SinkPathError) as e:
        dmi.attach(model, {"sink": str(path)})
    assert "sink" in str(e.value) and str(path) in str(e.value)


def test_spec_files_json_yaml_and_malformed(tmp_path):
    spec = dmi.CaptureSpec(hooks=["resid", "hook_logits"], tokens="last", requests={"ids": ["a", "b"]},
                           ring={"bytes": 4096}, overload="drop", sink={"kind": "hdf5", "path": "x.h5"})
    j = tmp_path / "s.json"
    j.write_text(spec.to_json())
    assert dmi.CaptureSpec.parse(str(j)) == spec
    y = tmp_path / "s.yaml"
    import yaml

    y.write_text(yaml.safe_dump(json.loads(spec.to_json())))
    assert dmi.CaptureSpec.from_file(y) == spec
    assert dmi.CaptureSpec.model_validate_json(spec.to_json()) == spec
    bad = tmp_path / "bad.json"
    bad.write_text('{"hooks": ["resid",]}')
    with pytest.raises(SpecError, match="malformed spec file"):
        dmi.CaptureSpec.from_file(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("hooks: [resid\ntokens: all")
    with pytest.raises(SpecError, match="malformed"):
        dmi.CaptureSpec.from_file(bad_yaml)
    with pytest.raises(SpecError, match="does not exist"):
        dmi.CaptureSpec.from_file(tmp_path / "missing.yaml")


def test_unknown_engine_and_beam_search(load, tmp_path):
    with pytest.raises(ValueError, match="no dmi adapter"):
        dmi.attach(object(), {"sink": str(tmp_path / "x.h5")})
    with pytest.raises(ValueError, match="offers its dmi.HookPoints \\(none\\) and 'module:"):
        dmi.attach(torch.nn.Linear(2, 2), {"sink": str(tmp_path / "x.h5")})  # default hooks: none in a Linear
    model = load("qwen3")
    with dmi.attach(model, {"hooks": ["blocks.0.hook_resid_post"], "sink": str(tmp_path / "b.h5")}):
        with pytest.raises(ValueError, match="beam search"):
            model.generate(input_ids=torch.tensor([[1, 2]]), num_beams=2, max_new_tokens=2)


def test_second_session_on_one_engine_refused(load, tmp_path):
    model = load("qwen3")
    with dmi.attach(model, {"sink": str(tmp_path / "a.h5")}):
        with pytest.raises(dmi.DmiError, match="already has an open dmi session"):
            dmi.attach(model, {"sink": str(tmp_path / "b.h5")})
