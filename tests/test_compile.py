"""torch.compile(fullgraph=True) of an attached HF model captures exactly what eager does: every
step, every hook (no hook traced once and never run again)."""
from __future__ import annotations

import pytest
import torch

import dmi

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_q", "hook_logits"]


def _run(model, fn, out, steps=3):
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with dmi.attach(model, {"hooks": HOOKS, "sink": out}):
        with torch.no_grad():
            for k in range(steps):
                fn(ids + k, attention_mask=mask)
    return dmi.open(out)


@pytest.mark.parametrize("compile_first", [False, True])
def test_compiled_fullgraph_equals_eager(compile_first, load, tmp_path):
    torch._dynamo.reset()
    model = load("qwen3")
    eager = _run(model, model, str(tmp_path / "eager.h5"))
    compiled_fn = torch.compile(model, fullgraph=True)
    if compile_first:  # compiled before attach: attaching must not leave a stale graph without captures
        with torch.no_grad():
            compiled_fn(torch.tensor([[1, 2]]))
    comp = _run(model, compiled_fn, str(tmp_path / "comp.h5"))
    assert comp.requests == eager.requests == [str(i) for i in range(6)]
    assert comp.hooks == eager.hooks
    for hook in eager.hooks:
        for r in eager.requests:
            assert torch.equal(comp.positions(hook, r), eager.positions(hook, r)), (hook, r)
            assert (comp.get(hook, r) - eager.get(hook, r)).abs().max() < 1e-5, (hook, r)
    assert comp.stats["rows"] == eager.stats["rows"]
    # detached: the compiled model runs on, capturing nothing and raising nothing
    with torch.no_grad():
        compiled_fn(torch.tensor([[3, 4, 5]]))
