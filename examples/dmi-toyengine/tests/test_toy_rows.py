"""Rows of the toy engine's flat, continuously batched steps: who, where, and when.

The schedule below is worked out by hand (max_batch=2, one arrival per step, 3 new tokens):

    step 0: a prefill 0..2
    step 1: a decode 3            | b prefill 0..1       (prefill mixed with decode)
    step 2: a decode 4            | b decode 2           (c waits: no free slot; a finishes)
    step 3: b decode 3            | c prefill 0          (c takes a's slot; b finishes)
    step 4: c decode 1
    step 5: c decode 2
"""
from __future__ import annotations

from importlib.metadata import entry_points

import dmi
import numpy as np
import pytest
import torch
from dmi import plugins
from dmi.errors import UnknownHookError
from dmi.plan.rows import DECODE, PREFILL
from test_toy_conformance import serve

from dmi_toyengine import Engine
from dmi_toyengine import plugin as toy_plugin
from dmi_toyengine.adapter import ToyAdapter

PROMPTS = [[1, 2, 3], [4, 5], [6]]
NEW = 3
P, D = PREFILL, DECODE
SCHEDULE = [  # (request ids, request index per row, position per row, phase per row)
    (["req-a"], [0, 0, 0], [0, 1, 2], [P, P, P]),
    (["req-a", "req-b"], [0, 1, 1], [3, 0, 1], [D, P, P]),
    (["req-a", "req-b"], [0, 1], [4, 2], [D, D]),
    (["req-b", "req-c"], [0, 1], [3, 0], [D, P]),
    (["req-c"], [0], [1], [D]),
    (["req-c"], [0], [2], [D]),
]


class RecordingSession:
    """Stands in for dmi.Session: records what the adapter hands over, step by step."""

    def __init__(self):
        self.tables, self.captures, self.open = [], [], False

    def begin_step(self, rows):
        assert not self.open, "begin_step twice without end_step"
        self.open = True
        self.tables.append(rows)

    def capture(self, i, x, flat=False):
        assert self.open, "capture outside a step"
        self.captures.append((len(self.tables) - 1, i, tuple(x.shape), flat))

    def end_step(self):
        assert self.open, "end_step without begin_step"
        self.open = False


def test_row_tables_follow_the_engine_schedule():
    engine = Engine(max_batch=2, seed=0)
    adapter = ToyAdapter(engine)
    session = RecordingSession()
    adapter.arm(session, adapter.bind(["blocks.0.hook_resid_post", "blocks.1.attn.hook_q", "hook_logits"]))
    try:
        serve(engine, PROMPTS, NEW)
    finally:
        adapter.disarm()

    assert len(session.tables) == len(SCHEDULE)
    for step, (t, (ids, request, position, phase)) in enumerate(zip(session.tables, SCHEDULE)):
        assert (t.batch, t.tokens) == (1, len(request)), f"step {step}"
        assert t.request_ids == ids, f"step {step}"
        assert t.request.tolist() == request, f"step {step}"
        assert t.position.tolist() == position, f"step {step}"
        assert t.phase.tolist() == phase, f"step {step}"
        assert t.request.dtype == np.int32 and t.position.dtype == np.int64 and t.phase.dtype == np.int8
        cfg = engine.config
        # Every hook has one row per token of the step, logits included, passed flat.
        assert [c for c in session.captures if c[0] == step] == [
            (step, 0, (len(request), cfg.hidden), True),
            (step, 1, (len(request), cfg.n_heads, cfg.head_dim), True),
            (step, 2, (len(request), cfg.vocab_size), True),
        ]


def test_file_has_engine_ids_and_continuing_positions(tmp_path):
    engine = Engine(max_batch=2, seed=0)
    out = str(tmp_path / "toy.h5")
    with dmi.attach(engine, dmi.CaptureSpec(hooks=["blocks.1.hook_resid_post", "hook_logits"], sink=out)) as s:
        serve(engine, PROMPTS, NEW)
    assert s.stats()["hooks"]["hook_logits"]["written"] == 3 + 2 + 1 + 3 * (NEW - 1)

    run = dmi.open(out)
    assert run.meta["engine"] == "toyengine"
    assert run.meta["model"] == "toyengine/toy-llama-seed0"
    assert sorted(run.requests) == ["req-a", "req-b", "req-c"]
    expected = {  # positions 0..len(prompt)+NEW-2 and the engine step that computed each
        "req-a": ([0, 1, 2, 3, 4], [0, 0, 0, 1, 2]),
        "req-b": ([0, 1, 2, 3], [1, 1, 2, 3]),
        "req-c": ([0, 1, 2], [3, 4, 5]),
    }
    for hook in ("blocks.1.hook_resid_post", "hook_logits"):
        for rid, (positions, steps) in expected.items():
            assert run.positions(hook, rid).tolist() == positions, (hook, rid)
            assert run.steps(hook, rid).tolist() == steps, (hook, rid)
    assert run.get("hook_logits", "req-a").shape == (5, engine.config.vocab_size)


def test_found_through_the_dmi_entry_point():
    eps = {ep.name: ep.value for ep in entry_points(group="dmi")}
    assert eps.get("toyengine") == "dmi_toyengine.plugin"
    assert "toyengine" in dict(plugins.manager().list_name_plugin())
    assert isinstance(plugins.adapter_for(Engine()), ToyAdapter)
    assert [t.arch for t in plugins.arch_tables("toyengine")] == ["toy-llama"]
    with pytest.raises(ValueError, match="no table for arch 'toy-mamba'; known: toy-llama"):
        plugins.adapter_for(Engine(arch="toy-mamba"))
    assert toy_plugin.dmi_adapter_for(engine=object(), tables=plugins.arch_tables) is None  # not ours: no claim


@pytest.mark.parametrize(("hook", "message"), [
    ("blocks.0.hook_nope", "unknown hook"),
    ("blocks.7.hook_resid_post", "layer 7 is out of range; the model has 2 layers"),
    ("blocks.0.attn.hook_pattern", "does not offer attn.hook_pattern"),
    ("module:blocks.0.mpl", "has no module 'blocks.0.mpl'"),
    ("module:blocks.0.mlp:sideways", "write module hooks as"),
])
def test_bad_hooks_refused_before_touching_the_engine(tmp_path, hook, message):
    engine = Engine(max_batch=2, seed=0)
    with pytest.raises(UnknownHookError, match=message):
        dmi.attach(engine, dmi.CaptureSpec(hooks=[hook], sink=str(tmp_path / "bad.h5")))
    assert engine.step_listeners == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in engine.model.modules())


def test_module_hooks_and_detach_keeps_other_listeners(tmp_path):
    engine = Engine(max_batch=2, seed=0)
    mine = RecordingListener()
    engine.step_listeners.append(mine)
    listeners = engine.step_listeners
    out = str(tmp_path / "mod.h5")
    spec = dmi.CaptureSpec(hooks=["blocks.0.hook_resid_mid", "module:blocks.0.ln2:input", "module:blocks.0.mlp.act"],
                           sink=out)
    with dmi.attach(engine, spec):
        assert len(engine.step_listeners) == 2
        serve(engine, PROMPTS, NEW)
    assert engine.step_listeners is listeners and engine.step_listeners == [mine]
    assert mine.steps == len(SCHEDULE)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in engine.model.modules())

    run = dmi.open(out)
    assert run.source("module:blocks.0.mlp.act") == "model.blocks.0.mlp.act:output"
    for rid in ("req-a", "req-b", "req-c"):
        assert torch.equal(run.get("module:blocks.0.ln2:input", rid), run.get("blocks.0.hook_resid_mid", rid))
        assert run.get("module:blocks.0.mlp.act", rid).shape[1:] == (engine.config.intermediate,)


class RecordingListener:
    def __init__(self):
        self.steps = 0

    def begin(self, batch):
        pass

    def end(self, batch):
        self.steps += 1
