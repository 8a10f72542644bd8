"""Interventions inside compiled forwards (HF): the edit is traced into the graph as tensor ops
over the step's edit table, so the compiled model steers exactly the rows eager steers, a
different set each step, with no dmi Python inside the compiled forward (strict mode)."""
from __future__ import annotations

import pytest
import torch

import dmi
from helpers import assert_same_capture

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"]
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])


def _interventions(hidden: int, heads: int):
    g = torch.Generator().manual_seed(5)
    return [
        # requests 1, 2 and 5: row 1, then row 0, then row 1 of the three forwards
        {"hook": "blocks.0.hook_resid_post", "op": "add", "value": torch.randn(hidden, generator=g).tolist(),
         "scale": 2.0, "requests": {"ids": ["1", "2", "5"]}, "tokens": {"positions": [[1, 3]]}},
        {"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [heads - 1], "requests": {"ids": ["2", "3"]},
         "capture": "before"},
        {"hook": "blocks.1.hook_resid_post", "op": "project_out", "value": torch.randn(hidden, generator=g).tolist(),
         "requests": {"ids": ["4"]}},
    ]


def _forwards(engine, call, out, interventions, steps=3):
    with dmi.attach(engine, {"hooks": HOOKS, "sink": out, "interventions": interventions}) as s:
        with torch.no_grad():
            for k in range(steps):
                call(IDS + k, attention_mask=MASK)
        s.flush()
        stats = s.stats()
    return dmi.open(out), stats


@pytest.fixture
def eager(load, tmp_path):
    model = load("qwen3")
    ivs = _interventions(model.config.hidden_size, model.config.num_attention_heads)
    run, stats = _forwards(model, model, str(tmp_path / "eager.h5"), ivs)
    plain, _ = _forwards(model, model, str(tmp_path / "plain.h5"), [])
    return model, ivs, run, stats, plain


def test_whole_model_compiled_steers_like_eager(eager, tmp_path, monkeypatch):
    model, ivs, want, want_stats, plain = eager
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    _forwards(compiled, compiled, str(tmp_path / "warm.h5"), ivs)  # compiles (tracing runs Python)
    monkeypatch.setenv("DMI_STRICT", "1")
    run, stats = _forwards(compiled, compiled, str(tmp_path / "c.h5"), ivs)
    assert stats["strict"] == [], stats["strict"]
    assert_same_capture(run, want, tol=1e-5)
    assert stats["interventions"] == want_stats["interventions"]
    books = stats["interventions"]
    assert books["0:add@blocks.0.hook_resid_post"]["requests"] == {"1": [[1, 3]], "2": [[1, 3]], "5": [[1, 3]]}
    assert set(books["1:zero@blocks.0.attn.hook_z"]["requests"]) == {"2", "3"}
    # the edits did act, and only on their requests
    steered = {"1", "2", "3", "4", "5"}
    assert not torch.equal(run.get("blocks.1.hook_resid_post", "4"), plain.get("blocks.1.hook_resid_post", "4"))
    for rid in set(plain.requests) - steered:
        for hook in plain.hooks:
            assert (run.get(hook, rid) - plain.get(hook, rid)).abs().max() < 1e-5
    # capture "before": hook_z as the model computed it, even on the rows it then zeroed
    assert (run.get("blocks.0.attn.hook_z", "3") - plain.get("blocks.0.attn.hook_z", "3")).abs().max() < 1e-5


def test_static_cache_generate_steers_like_eager(load, tmp_path, monkeypatch):
    """transformers compiles the decode step itself (CUDA graphs on a GPU); the step's edit
    table is written outside the graph and the replayed graph reads it."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = load("qwen3")
    ivs = _interventions(model.config.hidden_size, model.config.num_attention_heads)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
              pad_token_id=0)
    ivs = [{**ivs[0], "requests": {"ids": ["1"]}, "tokens": {"mode": "decode"}}, ivs[1]]
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "eager.h5"), "interventions": ivs}) as s:
        gen_e = model.generate(**kw)
        books_e = s.stats()["interventions"]
    cc = CompileConfig(fullgraph=True)
    cc._compile_all_devices = True
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "warm.h5"), "interventions": ivs}):
        model.generate(**kw, cache_implementation="static", compile_config=cc)
    monkeypatch.setenv("DMI_STRICT", "1")
    with dmi.attach(model, {"hooks": HOOKS, "sink": str(tmp_path / "comp.h5"), "interventions": ivs}) as s:
        gen_c = model.generate(**kw, cache_implementation="static", compile_config=cc)
        s.flush()
        stats = s.stats()
    assert stats["strict"] == [], stats["strict"]
    assert torch.equal(gen_e, gen_c)
    assert stats["interventions"] == books_e
    assert books_e["0:add@blocks.0.hook_resid_post"]["requests"] == {"1": [[5, 9]]}
    assert_same_capture(dmi.open(tmp_path / "comp.h5"), dmi.open(tmp_path / "eager.h5"), tol=1e-4)
