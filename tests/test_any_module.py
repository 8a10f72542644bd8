"""Any nn.Module: module: hooks and HookPoints, one forward = one step, batch rows = requests;
HookPoint names are checked."""
from __future__ import annotations

import pytest
import torch

import dmi
from dmi.errors import SpecError


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.hook_mid = dmi.HookPoint("blocks.0.hook_resid_mid")
        self.hook_act = dmi.HookPoint("act")

    def forward(self, x):
        h = self.hook_act(torch.relu(self.up(x)))
        return self.hook_mid(x + self.down(h))


def test_plain_module_with_hookpoints_and_module_hooks(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    x1, x2 = torch.randn(2, 5, 8), torch.randn(1, 3, 8)
    out = str(tmp_path / "m.h5")
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.*.hook_resid_mid", "act", "module:up", "module:down:input"],
                                           sink=out)):
        with torch.no_grad():
            y1, y2 = model(x1), model(x2)
    run = dmi.open(out)
    assert run.requests == ["0", "1", "2"]  # batch rows of each forward are new requests
    with torch.no_grad():
        h1 = torch.relu(model.up(x1))
    for r, (y, x, h) in enumerate([(y1[0], x1[0], h1[0]), (y1[1], x1[1], h1[1]), (y2[0], x2[0], torch.relu(model.up(x2))[0])]):
        assert torch.allclose(run.get("blocks.0.hook_resid_mid", str(r)), y, atol=1e-6)
        assert torch.allclose(run.get("act", str(r)), h, atol=1e-6)
        assert torch.allclose(run.get("module:up", str(r)), model.up(x).detach(), atol=1e-6)
        assert torch.allclose(run.get("module:down:input", str(r)), h, atol=1e-6)
        assert run.positions("act", str(r)).tolist() == list(range(len(x)))


def test_duplicate_hookpoint_names_are_refused(tmp_path):
    model = Tiny()
    model.hook_act.name = "blocks.0.hook_resid_mid"
    with pytest.raises(SpecError, match="two HookPoints are named 'blocks.0.hook_resid_mid'"):
        dmi.attach(model, {"hooks": ["module:up"], "sink": str(tmp_path / "x.h5")})


def test_a_hookpoint_cannot_take_a_builtin_hooks_name_elsewhere(load, tmp_path):
    model = load("qwen3")
    model.model.layers[0].mlp.add_module("hp", dmi.HookPoint("blocks.0.hook_resid_post"))
    try:
        with pytest.raises(SpecError, match="already offers at 'model.layers.0'"):
            dmi.attach(model, {"hooks": ["blocks.0.hook_resid_post"], "sink": str(tmp_path / "x.h5")})
    finally:
        del model.model.layers[0].mlp.hp
