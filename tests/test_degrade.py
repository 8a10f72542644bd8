"""`degrade`: above the high watermark capture only the declared fallback, back below the low one;
every switch recorded, every row given up counted and recorded as a gap."""
from __future__ import annotations

import pytest

import dmi
from helpers import assert_books_balance, fed_sequences, left_pad
from reference import reference
from test_overload import SlowSinkPlugin  # noqa: F401  (registers the slow sink kind)
from test_overload import slow_plugin  # noqa: F401

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
PAD, NO_EOS = 257, 319
HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]


def test_degrade_switches_and_accounts_for_everything(load, out):
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    spec = dmi.CaptureSpec(hooks=HOOKS, overload="degrade", ring={"bytes": 8192},
                           degrade={"fallback": {"hooks": ["blocks.1.hook_resid_post"], "tokens": "last"},
                                    "high": 0.5, "low": 0.1},
                           # slow enough that the ring fills however slow a loaded machine runs the model
                           sink={"kind": "slow", "path": out, "delay": 0.08})
    with dmi.attach(model, spec):
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             pad_token_id=PAD, eos_token_id=NO_EOS)
    run = dmi.open(out)
    stats = run.stats
    assert_books_balance(stats)
    switches = stats["degrade_switches"]
    assert switches and switches[0]["to"] == "fallback" and switches[0]["ring_fill"] >= 0.5
    assert all(a["to"] != b["to"] for a, b in zip(switches, switches[1:]))  # alternating
    assert stats["drop_reasons"].get("degraded", 0) == stats["rows"]["dropped"] > 0
    assert len(run.gaps()) == stats["rows"]["dropped"]
    degraded_steps = _degraded_steps(switches, n_steps=10)
    seqs = fed_sequences(gen, PROMPTS)
    for rid, seq in enumerate(seqs):
        ref = reference(model, seq)
        for hook in run.hooks:
            have = run.positions(hook, str(rid)).tolist()
            gaps = run.gaps(hook=hook, request=str(rid))
            assert all(g["reason"] == "degraded" and g["step"] in degraded_steps for g in gaps)
            want = range(len(PROMPTS[rid]) - 1 if hook == "hook_logits" else 0, len(seq))
            assert sorted(have + [g["position"] for g in gaps]) == list(want)
            steps = run.steps(hook, str(rid)).tolist()
            if hook != "blocks.1.hook_resid_post":  # not in the fallback: nothing while degraded
                assert not set(steps) & degraded_steps
            if have:
                assert (run.get(hook, str(rid)) - ref[hook][have]).abs().max() < 1e-4


def _degraded_steps(switches, n_steps):
    out, state, i = set(), False, 0
    for step in range(n_steps):
        while i < len(switches) and switches[i]["step"] == step:
            state = switches[i]["to"] == "fallback"
            i += 1
        if state:
            out.add(step)
    return out


@pytest.mark.parametrize("degrade, field", [
    ({"fallback": {"hooks": ["blocks.0.hook_resid_pre"]}}, "degrade.fallback.hooks"),
    ({"fallback": {"hooks": ["hook_logits"], "tokens": {"mode": "all", "every": 3}}}, "degrade.fallback.tokens"),
])
def test_fallback_must_be_a_subset(degrade, field, load, tmp_path):
    model = load("qwen3")
    spec = {"hooks": HOOKS, "tokens": {"mode": "all", "every": 2}, "overload": "degrade", "degrade": degrade,
            "sink": str(tmp_path / "x.h5")}
    with pytest.raises(ValueError, match=field):
        dmi.attach(model, spec)
