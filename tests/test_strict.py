"""Strict mode (DMI_STRICT=1): every compiled granularity captures exactly what eager does, and
no dmi Python runs inside the compiled forward (only the capture op's own CPU kernel, which a
GPU replaces by the recorded Triton kernel) nor any per-hook host work inside an eager step.

A CPU test cannot replay a CUDA graph; what it can prove is that nothing a graph would skip
runs in the compiled region. What did not run here: CUDA-graph replay itself (scripts/gpu-check.sh).
"""
from __future__ import annotations

import pytest
import torch

import dmi
from helpers import assert_same_capture

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_q", "blocks.1.mlp.hook_post", "hook_logits"]
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("DMI_STRICT", "1")


def _forwards(engine, call, out, steps=3):
    with dmi.attach(engine, {"hooks": HOOKS, "sink": out}) as s:
        with torch.no_grad():
            for k in range(steps):
                call(IDS + k, attention_mask=MASK)
        s.flush()
        stats = s.stats()
    return dmi.open(out), stats


def _check(run, stats, eager):
    assert stats.get("strict") == [], stats.get("strict")
    assert run.requests == eager.requests and not run.gaps()
    assert_same_capture(run, eager, tol=1e-5)
    assert run.stats["rows"]["written"] == eager.stats["rows"]["written"] > 0


@pytest.fixture
def eager_run(load, tmp_path):
    model = load("qwen3")
    run, stats = _forwards(model, model, str(tmp_path / "eager.h5"))
    assert stats.get("strict") is None  # strict is off here: the fixture runs before monkeypatching
    return model, run


def test_eager_step_runs_no_per_hook_host_work(eager_run, strict, tmp_path):
    model, eager = eager_run
    run, stats = _forwards(model, model, str(tmp_path / "s.h5"))
    _check(run, stats, eager)


def test_whole_model_compiled_passed_to_attach(eager_run, strict, tmp_path, monkeypatch):
    model, eager = eager_run
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    monkeypatch.setenv("DMI_STRICT", "0")
    _forwards(compiled, compiled, str(tmp_path / "warm.h5"))  # compiles (tracing runs Python)
    monkeypatch.setenv("DMI_STRICT", "1")
    run, stats = _forwards(compiled, compiled, str(tmp_path / "s.h5"))
    _check(run, stats, eager)


def test_decoder_compiled(eager_run, strict, tmp_path, monkeypatch):
    model, eager = eager_run
    torch._dynamo.reset()
    inner = model.model
    inner.forward = torch.compile(inner.forward, fullgraph=True)
    try:
        monkeypatch.setenv("DMI_STRICT", "0")
        _forwards(model, model, str(tmp_path / "warm.h5"))
        monkeypatch.setenv("DMI_STRICT", "1")
        run, stats = _forwards(model, model, str(tmp_path / "s.h5"))
    finally:
        del inner.forward
    _check(run, stats, eager)


def test_compiled_before_attach_captures_exactly(eager_run, tmp_path):
    """A model compiled and run before dmi is attached: dynamo's default skips guards on module
    hooks, so the old graph would run without capture points (0 rows, silently). Attaching turns
    the guards on and resets stale graphs: exact."""
    model, eager = eager_run
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    cfg.skip_nnmodule_hook_guards = True  # dynamo's default in a process dmi has not touched yet
    try:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            compiled(IDS, attention_mask=MASK)
        run, stats = _forwards(model, compiled, str(tmp_path / "c.h5"))
    finally:
        cfg.skip_nnmodule_hook_guards = False
    assert stats["rows"]["written"] > 0
    assert run.requests == eager.requests and not run.gaps()
    assert_same_capture(run, eager, tol=1e-5)


def test_static_cache_generate(load, strict, tmp_path, monkeypatch):
    """transformers compiles the decode step itself (CUDA graphs on a GPU): the compiled call is
    bracketed from outside, so every decode step is planned outside the graph."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = load("qwen3")
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=319)
    monkeypatch.setenv("DMI_STRICT", "0")
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "eager.h5")}):
        gen_e = model.generate(**kw)
    cc = CompileConfig(fullgraph=True)
    cc._compile_all_devices = True
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "warm.h5")}):
        model.generate(**kw, cache_implementation="static", compile_config=cc)
    monkeypatch.setenv("DMI_STRICT", "1")
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "comp.h5")}) as s:
        gen_c = model.generate(**kw, cache_implementation="static", compile_config=cc)
        s.flush()
        stats = s.stats()
    assert torch.equal(gen_e, gen_c)
    assert stats["strict"] == [], stats["strict"]
    e, c = dmi.open(tmp_path / "eager.h5"), dmi.open(tmp_path / "comp.h5")
    assert c.requests == e.requests and not c.gaps()
    assert_same_capture(c, e, tol=1e-4)


def test_strict_mode_catches_python_inside_a_compiled_forward(load, strict, tmp_path):
    """The probe itself can fail: a hook that calls into the plan from inside a compiled graph
    (through a graph break) is reported."""
    model = load("qwen3")
    torch._dynamo.reset()
    from dmi.plan import rows as plan_rows

    import numpy as np

    table = plan_rows.RowTable(1, 1, ["a"], np.zeros(1, "int32"), np.zeros(1, "int64"), np.zeros(1, "int8"))

    @torch._dynamo.disable
    def python_in_the_graph(x):
        table.take([0])
        return x

    h = model.model.layers[0].register_forward_hook(lambda m, a, o: (python_in_the_graph(o[0]),) + tuple(o[1:])
                                                    if isinstance(o, tuple) else python_in_the_graph(o))
    try:
        compiled = torch.compile(model)
        with dmi.attach(compiled, {"hooks": ["hook_logits"], "sink": str(tmp_path / "x.h5")}) as s:
            with torch.no_grad():
                compiled(IDS, attention_mask=MASK)
            stats = s.stats()
    finally:
        h.remove()
    assert any("take() ran inside" in v for v in stats["strict"]), stats["strict"]
