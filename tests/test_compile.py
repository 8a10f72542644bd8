"""torch.compile(fullgraph=True) of an attached HF model captures exactly what eager does: every
step, every hook (no hook traced once and never run again)."""
from __future__ import annotations

import pytest
import torch

import dmi
from helpers import assert_same_capture

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
    assert_same_capture(comp, eager, tol=1e-5)
    assert comp.stats["rows"] == eager.stats["rows"]
    # detached: the compiled model runs on, capturing nothing and raising nothing
    with torch.no_grad():
        compiled_fn(torch.tensor([[3, 4, 5]]))


def test_generate_static_cache_auto_compiled_equals_eager(load, tmp_path):
    """generate(cache_implementation="static") compiles the decode step itself (on a GPU with
    CUDA graphs); on the CPU `_compile_all_devices` makes it do the same. The plan-driven
    capture points in its graph capture what eager generate captures."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = load("qwen3")
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
              eos_token_id=319)
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "eager.h5")}):
        gen_e = model.generate(**kw)
    cc = CompileConfig(fullgraph=True)
    cc._compile_all_devices = True
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "comp.h5")}):
        gen_c = model.generate(**kw, cache_implementation="static", compile_config=cc)
    assert torch.equal(gen_e, gen_c)
    e, c = dmi.open(tmp_path / "eager.h5"), dmi.open(tmp_path / "comp.h5")
    assert c.requests == e.requests and not c.gaps()
    assert_same_capture(c, e, tol=1e-4)
