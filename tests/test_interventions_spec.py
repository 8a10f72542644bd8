"""Bad interventions are refused at attach, naming the field, before the engine is touched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dmi
from dmi.errors import SpecError

HOOK = "blocks.0.hook_resid_post"


def _iv(**kw):
    return {"hook": HOOK, "op": "add", "value": [0.0] * 64, **kw}


@pytest.mark.parametrize("entry, field, words", [
    ({"hook": HOOK, "op": "steer"}, "interventions[0].op", "'add', 'set'"),
    ({"hook": HOOK, "op": "add"}, "interventions[0]", "needs a value"),
    ({"hook": HOOK, "op": "zero", "value": [1.0]}, "interventions[0]", "takes no value"),
    ({"hook": HOOK, "op": "scale"}, "interventions[0]", "needs 'scale'"),
    ({"hook": HOOK, "op": "set", "value": [1.0], "heads": [0]}, "interventions[0]", "'heads' applies to op 'zero'"),
    ({"hook": HOOK, "op": "patch", "value": [1.0]}, "interventions[0]", "stored run"),
    (_iv(bogus=1), "interventions[0].bogus", "valid fields"),
    (_iv(value={"path": "x.npy"}), "interventions[0].value", "{'file': path"),
    (_iv(value=3.0), "interventions[0].value", "a vector"),
    (_iv(tokens={"mode": "first"}), "interventions[0].tokens.mode", "'prefill'"),
    (_iv(capture="during"), "interventions[0].capture", "'after' or 'before'"),
])
def test_spec_shape_errors(entry, field, words):
    with pytest.raises(SpecError) as e:
        dmi.CaptureSpec.parse({"interventions": [entry]})
    assert e.value.field == field, str(e.value)
    assert words in str(e.value)


def test_empty_hooks_need_interventions():
    with pytest.raises(SpecError) as e:
        dmi.CaptureSpec.parse({"hooks": []})
    assert e.value.field == "hooks"
    assert dmi.CaptureSpec.parse({"hooks": [], "interventions": [_iv()]}).hooks == []


def test_spec_round_trips_through_json():
    spec = dmi.CaptureSpec.parse({"interventions": [_iv(requests={"ids": [1]}, tokens="decode"),
                                                    {"hook": HOOK, "op": "patch", "value": {"run": "a.h5", "request": 2}}]})
    assert dmi.CaptureSpec.parse(spec.to_json()) == spec


def _attach_error(model, entry, tmp_path, **spec):
    with pytest.raises(SpecError) as e:
        dmi.attach(model, {"hooks": ["blocks.1.hook_resid_post"], "sink": str(tmp_path / "x.h5"),
                           "interventions": [entry], **spec})
    assert not (tmp_path / "x.h5").exists()  # refused before anything was created
    return e.value


@pytest.fixture
def stored(load, tmp_path):
    model = load("qwen3")
    path = str(tmp_path / "stored.h5")
    with dmi.attach(model, {"hooks": [HOOK, "blocks.0.attn.hook_z"], "sink": path}):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    return path


def test_attach_errors_name_the_field(load, tmp_path, stored):
    model = load("qwen3")
    hooks_before = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    np.save(tmp_path / "v3.npy", np.zeros(3, np.float32))
    np.save(tmp_path / "vc.npy", np.zeros(64, np.complex64))
    cases = [
        ({"hook": "blocks.9.hook_resid_post", "op": "zero"}, "interventions[0].hook", "blocks.9"),
        ({"hook": "hook_logits", "op": "zero"}, "interventions[0].hook", "not the step's token rows"),
        ({"hook": "blocks.0.attn.hook_rot_q", "op": "zero"}, "interventions[0].hook", "cannot be edited"),
        (_iv(value=[1.0, 2.0]), "interventions[0].value", "shape (2,) does not fit"),
        (_iv(value=str(tmp_path / "missing.npy")), "interventions[0].value", "does not exist"),
        (_iv(value=str(tmp_path / "v.txt")), "interventions[0].value", ".npy"),
        (_iv(value=str(tmp_path / "v3.npy")), "interventions[0].value", "shape (3,)"),
        (_iv(value=str(tmp_path / "vc.npy")), "interventions[0].value", "real numbers"),
        (_iv(value=[float("nan")] * 64), "interventions[0].value", "non-finite"),
        ({"hook": HOOK, "op": "zero", "heads": [0]}, "interventions[0].heads", "heads dimension"),
        ({"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [7]}, "interventions[0].heads", "out of range"),
        ({"hook": HOOK, "op": "project_out", "value": [0.0] * 64}, "interventions[0].value", "non-zero"),
        ({"hook": HOOK, "op": "patch", "value": {"run": stored, "request": "9"}}, "interventions[0].value.request",
         "no request '9'"),
        ({"hook": HOOK, "op": "patch", "value": {"run": stored, "request": "0", "hook": "blocks.1.hook_mlp_out"}},
         "interventions[0].value.hook", "no hook"),
        ({"hook": HOOK, "op": "patch", "value": {"run": stored, "request": "0", "hook": "blocks.0.attn.hook_z"}},
         "interventions[0].value", "stored rows have shape (4, 32)"),
        ({"hook": HOOK, "op": "add", "value": {"run": stored, "request": "0", "position": 5}},
         "interventions[0].value.position", "no row at position 5"),
        ({"hook": HOOK, "op": "patch", "value": {"run": str(tmp_path / "nope.h5"), "request": "0"}},
         "interventions[0].value.run", "cannot open"),
    ]
    for entry, field, words in cases:
        err = _attach_error(model, entry, tmp_path)
        assert err.field == field and words in str(err), (entry, str(err))
    err = _attach_error(model, {**_iv(), "capture": "before"}, tmp_path,
                        interventions=[_iv(), {**_iv(), "capture": "before"}])
    assert err.field == "interventions[1].capture", str(err)
    err = _attach_error(model, _iv(), tmp_path, interventions=[_iv(name="a"), _iv(name="a")])
    assert err.field == "interventions" and "'a'" in str(err)
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == hooks_before


def test_a_run_row_steers_as_the_stored_vector(load, tmp_path, stored):
    """value {'run', 'request', 'position'}: the stored row is the vector."""
    model = load("qwen3")
    row = dmi.open(stored).get(HOOK, "0")[1]
    outs = []
    for k, value in enumerate(({"run": stored, "request": "0", "position": 1}, row.tolist())):
        with dmi.attach(model, {"hooks": ["blocks.1.hook_resid_post"], "sink": str(tmp_path / f"{k}.h5"),
                                "interventions": [{"hook": HOOK, "op": "add", "value": value}]}) as s:
            with torch.no_grad():
                model(torch.tensor([[4, 5, 6]]))
            s.flush()
        outs.append(dmi.open(tmp_path / f"{k}.h5").get("blocks.1.hook_resid_post", "0"))
    assert torch.equal(outs[0], outs[1])


def test_an_adapter_without_interventions_refuses_them(tmp_path):
    toy = pytest.importorskip("dmi_toyengine")
    engine = toy.Engine()
    with pytest.raises(SpecError) as e:
        dmi.attach(engine, {"hooks": ["blocks.0.hook_resid_post"], "sink": str(tmp_path / "x.h5"),
                            "interventions": [_iv()]})
    assert e.value.field == "interventions" and "toy" in str(e.value)
