"""Interventions (spec field `interventions`) on HF, eager: each operation against an oracle.

The oracle is the same edit written by hand as a plain forward hook on an unpadded
single-sequence generate of that request alone: greedy tokens must be identical and the
captured activations downstream of the edit within 1e-4. Requests of the same batch that no
intervention selects must be bit-identical to a run without interventions.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dmi
from helpers import left_pad

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
NEW = 5
PAD = 257
DOWN = "blocks.1.hook_resid_post"
STEERED = "1"


def _vec(n: int, seed: int) -> list[float]:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(model, prompts):
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=PAD)


def _dmi_run(model, path, interventions, hooks=(DOWN,), prompts=PROMPTS):
    with dmi.attach(model, {"hooks": list(hooks), "sink": path, "interventions": interventions}) as s:
        out = _generate(model, prompts)
        s.flush()
        stats = s.stats()
    return out, dmi.open(path), stats


# -- the oracle: a plain hook on the request alone ------------------------------------------------

def _module(model, hook: str):
    """(module, reads its input?, row shape view) for the hooks these tests edit, by hand."""
    layer = int(hook.split(".")[1])
    block = model.model.layers[layer]
    cfg = model.config
    if hook.endswith("hook_resid_post"):
        return block, False, None
    if hook.endswith("attn.hook_z"):
        return block.self_attn.o_proj, True, (cfg.num_attention_heads, cfg.head_dim)
    if hook.endswith("mlp.hook_post"):
        return block.mlp.down_proj, True, None
    raise AssertionError(hook)


def _edit_by_hand(x, op, value, scale, heads):
    if op == "add":
        return x + scale * value
    if op == "set":
        return value.expand_as(x).clone()
    if op == "scale":
        return x * scale
    if op == "zero":
        if heads is None:
            return torch.zeros_like(x)
        y = x.clone()
        y[:, heads, :] = 0
        return y
    if op == "project_out":
        u = value / value.norm()
        return x - (x @ u)[:, None] * u
    raise AssertionError(op)


def _oracle(model, prompt, iv):
    """Generated tokens and the DOWN rows of `prompt` alone, with iv applied by a plain hook."""
    mod, is_input, heads_view = _module(model, iv["hook"])
    value = torch.tensor(iv["value"]) if iv.get("value") is not None else None
    lo, hi = iv.get("positions", (0, 1 << 30))
    mode = iv.get("mode", "all")
    state = {"pos": 0, "forward": 0}
    down: list[torch.Tensor] = []

    def edit(t):
        t0, T = state["pos"], t.shape[1]
        state["pos"] += T
        phase_ok = mode == "all" or (mode == "decode") == (state["forward"] > 0)
        state["forward"] += 1
        rows = t[0].clone()
        view = rows.unflatten(-1, heads_view) if heads_view else rows
        for j in range(T):
            if phase_ok and lo <= t0 + j < hi:
                view[j] = _edit_by_hand(view[j:j + 1], iv["op"], value, iv.get("scale"), iv.get("heads"))[0]
        return rows.unsqueeze(0)

    if is_input:
        h = mod.register_forward_pre_hook(lambda m, a: (edit(a[0]), *a[1:]))
    else:
        h = mod.register_forward_hook(lambda m, a, o: edit(o) if torch.is_tensor(o) else (edit(o[0]), *o[1:]))
    d = model.model.layers[int(DOWN.split(".")[1])].register_forward_hook(
        lambda m, a, o: down.append((o if torch.is_tensor(o) else o[0])[0]))
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=PAD)
    finally:
        h.remove()
        d.remove()
    return out[0, len(prompt):], torch.cat(down)


def _spec_entry(iv):
    entry = {k: iv[k] for k in ("hook", "op", "value", "scale", "heads") if iv.get(k) is not None}
    entry["requests"] = {"ids": [STEERED]}
    tokens = {"mode": iv.get("mode", "all")}
    if "positions" in iv:
        tokens["positions"] = [list(iv["positions"])]
    entry["tokens"] = tokens
    return entry


CASES = {
    "add": dict(hook="blocks.0.hook_resid_post", op="add", value=_vec(64, 1), scale=3.0, positions=(1, 6)),
    "add-decode": dict(hook="blocks.0.hook_resid_post", op="add", value=_vec(64, 2), scale=2.0, mode="decode"),
    "set": dict(hook="blocks.0.mlp.hook_post", op="set", value=_vec(128, 3), positions=(2, 4)),
    "scale": dict(hook="blocks.0.hook_resid_post", op="scale", scale=-2.0),
    "zero-heads": dict(hook="blocks.0.attn.hook_z", op="zero", heads=[1, 3], positions=(0, 5)),
    "zero": dict(hook="blocks.1.mlp.hook_post", op="zero", positions=(3, 7)),
    "project_out": dict(hook="blocks.0.hook_resid_post", op="project_out", value=_vec(64, 4)),
}


@pytest.fixture(scope="module")
def baseline(load, tmp_path_factory):
    model = load("qwen3")
    out, run, _ = _dmi_run(model, str(tmp_path_factory.mktemp("base") / "base.h5"), [])
    return model, out, run


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_a_plain_hook_on_the_request_alone(baseline, tmp_path, case):
    model, base_out, base = baseline
    iv = CASES[case]
    if iv["op"] == "set":
        iv = {**iv, "value": _vec(model.config.intermediate_size, 3)}
    out, run, stats = _dmi_run(model, str(tmp_path / "steered.h5"), [_spec_entry(iv)])
    width = max(map(len, PROMPTS))
    want_tokens, want_down = _oracle(model, PROMPTS[1], iv)
    assert torch.equal(out[1, width:], want_tokens), (out[1, width:].tolist(), want_tokens.tolist())
    got = run.get(DOWN, STEERED)
    assert torch.equal(run.positions(DOWN, STEERED), torch.arange(len(want_down)))
    err = (got - want_down).abs().max().item()
    assert err < 1e-4, err
    # the edit did something: the steered request differs from the unsteered run
    assert not torch.equal(got, base.get(DOWN, STEERED))
    # the other requests of the batch are exactly the unsteered run's
    for b, rid in ((0, "0"), (2, "2")):
        assert torch.equal(out[b], base_out[b])
        assert torch.equal(run.get(DOWN, rid), base.get(DOWN, rid))
    # the books: exactly the rows the oracle edited, for request 1 alone
    fed = len(PROMPTS[1]) + NEW - 1
    lo, hi = iv.get("positions", (0, fed))
    if iv.get("mode") == "decode":
        lo = len(PROMPTS[1])
    want = [[lo, min(hi, fed)]]
    (name, books), = run.interventions.items()
    assert books["requests"] == {STEERED: want} and books["rows"] == want[0][1] - want[0][0]
    assert books["failed_rows"] == 0 and stats["interventions"][name]["rows"] == books["rows"]


def test_mixed_vectors_each_request_gets_its_own(baseline, tmp_path):
    """Two requests steered with different vectors in one batch, the third untouched."""
    model, base_out, base = baseline
    a = dict(hook="blocks.0.hook_resid_post", op="add", value=_vec(64, 7), scale=2.0)
    b = dict(hook="blocks.0.hook_resid_post", op="add", value=_vec(64, 8), scale=-1.5, positions=(2, 5))
    spec = [{**_spec_entry(a), "requests": {"ids": ["0"]}, "name": "a"},
            {**_spec_entry(b), "requests": {"ids": ["2"]}, "name": "b"}]
    out, run, _ = _dmi_run(model, str(tmp_path / "mixed.h5"), spec)
    width = max(map(len, PROMPTS))
    for rid, iv in (("0", a), ("2", b)):
        tokens, down = _oracle(model, PROMPTS[int(rid)], iv)
        assert torch.equal(out[int(rid), width:], tokens)
        assert (run.get(DOWN, rid) - down).abs().max().item() < 1e-4
    assert torch.equal(out[1], base_out[1]) and torch.equal(run.get(DOWN, "1"), base.get(DOWN, "1"))
    assert set(run.interventions) == {"a", "b"}
    assert run.interventions["b"]["requests"] == {"2": [[2, 5]]}


def test_two_edits_on_one_hook_compose_in_spec_order(baseline, tmp_path):
    model, _, _ = baseline
    v = _vec(64, 9)
    spec = [{"hook": "blocks.0.hook_resid_post", "op": "scale", "scale": 0.5, "requests": {"ids": ["1"]}},
            {"hook": "blocks.0.hook_resid_post", "op": "add", "value": v, "requests": {"ids": ["1"]}}]
    _, run, _ = _dmi_run(model, str(tmp_path / "two.h5"), spec, hooks=["blocks.0.hook_resid_post"])
    _, plain, _ = _dmi_run(model, str(tmp_path / "plain.h5"), [], hooks=["blocks.0.hook_resid_post"])
    want = plain.get("blocks.0.hook_resid_post", "1") * 0.5 + torch.tensor(v)
    # only the first step's rows (the prompt) see the same inputs in both runs
    n = len(PROMPTS[1])
    got = run.get("blocks.0.hook_resid_post", "1")[:n]
    assert torch.allclose(got, want[:n], atol=1e-6)


@pytest.mark.parametrize("when", ["after", "before"])
def test_capture_at_the_edited_hook_sees_the_stated_side(baseline, tmp_path, when):
    model, _, _ = baseline
    hook = "blocks.0.hook_resid_post"
    spec = [{"hook": hook, "op": "zero", "requests": {"ids": ["1"]}, "tokens": {"positions": [[0, 2]]},
             "capture": when}]
    _, run, _ = _dmi_run(model, str(tmp_path / "cap.h5"), spec, hooks=[hook])
    _, plain, _ = _dmi_run(model, str(tmp_path / "plain.h5"), [], hooks=[hook])
    got = run.get(hook, "1")[:2]
    if when == "after":
        assert torch.equal(got, torch.zeros_like(got))
    else:
        assert torch.equal(got, plain.get(hook, "1")[:2])


def test_patch_reproduces_the_stored_rows(baseline, tmp_path):
    model, base_out, base = baseline
    hook = "blocks.0.hook_resid_post"
    stored = str(tmp_path / "source.h5")
    with dmi.attach(model, {"hooks": [hook], "sink": stored}) as s:
        with torch.no_grad():
            model.generate(torch.tensor([[41, 42, 43, 44, 45, 46]]), max_new_tokens=3, min_new_tokens=3,
                           do_sample=False, pad_token_id=PAD)
        s.flush()
    src = dmi.open(stored)
    src_rows, src_pos = src.get(hook, "0"), src.positions(hook, "0")
    assert src_pos.tolist() == list(range(8))
    spec = [{"hook": hook, "op": "patch", "value": {"run": stored, "request": "0"}, "requests": {"ids": ["1"]}}]
    out, run, _ = _dmi_run(model, str(tmp_path / "patched.h5"), spec, hooks=[hook, DOWN])
    got, pos = run.get(hook, "1"), run.positions(hook, "1")
    assert torch.equal(got, src_rows[pos])  # every fed position of request 1 is a stored one
    # downstream of the patch, request 1 computes what the source request computed
    assert (run.get(DOWN, "1") - src_down(model, stored_prompt=[41, 42, 43, 44, 45, 46])[: len(pos)]).abs().max() < 1e-4
    for b, rid in ((0, "0"), (2, "2")):
        assert torch.equal(out[b], base_out[b]) and torch.equal(run.get(DOWN, rid), base.get(DOWN, rid))
    assert run.interventions["0:patch@" + hook]["requests"] == {"1": [[0, len(pos)]]}


def src_down(model, stored_prompt):
    """DOWN rows of the source prompt and its greedy continuation, by a plain hook."""
    rows = []
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: rows.append((o if torch.is_tensor(o) else o[0])[0]))
    try:
        with torch.no_grad():
            model.generate(torch.tensor([stored_prompt]), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           pad_token_id=PAD)
    finally:
        h.remove()
    return torch.cat(rows)


def test_patch_only_where_the_run_has_rows(baseline, tmp_path):
    model, _, _ = baseline
    hook = "blocks.0.hook_resid_post"
    stored = str(tmp_path / "source.h5")
    with dmi.attach(model, {"hooks": [hook], "sink": stored, "tokens": {"positions": [[1, 3]]}}) as s:
        with torch.no_grad():
            model(torch.tensor([[41, 42, 43, 44, 45, 46]]))
        s.flush()
    src = dmi.open(stored).get(hook, "0")
    spec = [{"hook": hook, "op": "patch", "value": {"run": stored, "request": 0}, "requests": {"ids": ["1"]}}]
    _, run, _ = _dmi_run(model, str(tmp_path / "patched.h5"), spec, hooks=[hook])
    _, plain, _ = _dmi_run(model, str(tmp_path / "plain.h5"), [], hooks=[hook])
    got = run.get(hook, "1")
    assert torch.equal(got[1:3], src)
    assert torch.equal(got[0], plain.get(hook, "1")[0])  # position 0 is not stored: not patched
    assert run.interventions["0:patch@" + hook]["requests"] == {"1": [[1, 3]]}


def test_value_files(baseline, tmp_path):
    """.npy, .safetensors and .pt values steer exactly like the same numbers inline."""
    from safetensors.torch import save_file

    model, _, _ = baseline
    v = torch.tensor(_vec(64, 11))
    np.save(tmp_path / "v.npy", v.numpy())
    save_file({"steer": v, "other": v * 2}, str(tmp_path / "v.safetensors"))
    torch.save(v, tmp_path / "v.pt")
    base = {"hook": "blocks.0.hook_resid_post", "op": "add", "requests": {"ids": ["1"]}}
    _, inline, _ = _dmi_run(model, str(tmp_path / "inline.h5"), [{**base, "value": v.tolist()}])
    for k, value in enumerate((str(tmp_path / "v.npy"), {"file": str(tmp_path / "v.safetensors"), "key": "steer"},
                               str(tmp_path / "v.pt"))):
        _, run, _ = _dmi_run(model, str(tmp_path / f"f{k}.h5"), [{**base, "value": value}])
        assert torch.equal(run.get(DOWN, "1"), inline.get(DOWN, "1")), value


def test_not_applied_rows_are_recorded(baseline, tmp_path):
    """A request is never silently unsteered: rows of a step whose edit hook did not run are
    recorded as not applied, and the run's errors say so."""
    model, _, _ = baseline
    hook = "blocks.0.hook_resid_post"
    spec = {"hooks": [DOWN], "sink": str(tmp_path / "x.h5"),
            "interventions": [{"hook": hook, "op": "zero", "requests": {"ids": ["1", "3"]}}]}
    layer = model.model.layers[0]
    with dmi.attach(model, spec) as s:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
            saved = dict(layer._forward_hooks)
            layer._forward_hooks.clear()
            try:
                model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
            finally:
                layer._forward_hooks.update(saved)
        stats = s.stats()
    books = stats["interventions"]["0:zero@" + hook]
    assert books["requests"] == {"1": [[0, 3]]}
    assert books["failed"] == {"not_applied": {"3": [[0, 3]]}} and books["failed_rows"] == 3
    assert any("did not run" in e for e in stats["errors"])


def test_steer_only_spec_captures_nothing(baseline, tmp_path):
    model, base_out, _ = baseline
    iv = dict(hook="blocks.0.hook_resid_post", op="add", value=_vec(64, 1), scale=3.0, positions=(1, 6))
    with dmi.attach(model, {"hooks": [], "sink": str(tmp_path / "only.h5"), "interventions": [_spec_entry(iv)]}) as s:
        out = _generate(model, PROMPTS)
        stats = s.stats()
    width = max(map(len, PROMPTS))
    assert torch.equal(out[1, width:], _oracle(model, PROMPTS[1], iv)[0])
    assert torch.equal(out[0], base_out[0]) and torch.equal(out[2], base_out[2])
    assert stats["interventions"]["0:add@blocks.0.hook_resid_post"]["rows"] == 5


def test_strict_eager_step_with_interventions(baseline, tmp_path, monkeypatch):
    model, _, _ = baseline
    monkeypatch.setenv("DMI_STRICT", "1")
    iv = dict(hook="blocks.0.attn.hook_z", op="zero", heads=[0], positions=(0, 5))
    spec = [_spec_entry(iv), {"hook": "blocks.1.hook_resid_post", "op": "scale", "scale": 2.0}]
    _, run, stats = _dmi_run(model, str(tmp_path / "strict.h5"), spec)
    assert stats["strict"] == []
    assert sum(b["rows"] for b in run.interventions.values()) > 0


def test_a_glob_patches_each_hook_from_its_own_stored_rows(baseline, tmp_path):
    model, _, _ = baseline
    hooks = "blocks.*.hook_resid_post"
    stored = str(tmp_path / "source.h5")
    with dmi.attach(model, {"hooks": [hooks], "sink": stored}) as s:
        with torch.no_grad():
            model(torch.tensor([[41, 42, 43, 44, 45, 46, 47, 48]]))
        s.flush()
    src = dmi.open(stored)
    spec = [{"hook": hooks, "op": "patch", "value": {"run": stored, "request": "0"}, "requests": {"ids": ["2"]}}]
    _, run, _ = _dmi_run(model, str(tmp_path / "patched.h5"), spec, hooks=[hooks])
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        pos = run.positions(hook, "2")
        assert torch.equal(run.get(hook, "2")[pos < 8], src.get(hook, "0")[pos[pos < 8]])
    (books,) = run.interventions.values()
    assert books["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert books["requests"] == {"2": [[0, 8]]}
