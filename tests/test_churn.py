"""Random churn on HF (batches of ragged prompts, EOS, tiny rings, every overload policy): the
books balance, every dropped row is a recorded gap, and every committed row equals the oracle
(an unpadded single-sequence forward of the request's own tokens)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmi
from helpers import assert_books_balance, fed_sequences, left_pad
from reference import reference

PAD = 257

schedule = st.lists(st.tuples(st.lists(st.lists(st.integers(1, 250), min_size=1, max_size=6), min_size=1, max_size=3),
                              st.integers(1, 4)), min_size=1, max_size=3)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(calls=schedule, ring=st.sampled_from([4 << 10, 16 << 10, 1 << 20]),
       overload=st.sampled_from(["block", "drop", "degrade"]), eos_pick=st.integers(0, 3))
def test_churn_books_balance_and_rows_equal_the_oracle(load, tmp_path_factory, calls, ring, overload, eos_pick):
    model = load("qwen3")
    out = str(tmp_path_factory.mktemp("churn") / "c.h5")
    spec = {"hooks": ["blocks.*.hook_resid_post", "blocks.0.attn.hook_v", "hook_logits"], "ring": {"bytes": ring},
            "overload": overload, "sink": out}
    if overload == "degrade":
        spec["degrade"] = {"fallback": {"hooks": ["hook_logits"], "tokens": "last"}, "high": 0.5, "low": 0.1}
    expected: dict[str, list[int]] = {}
    starts: dict[str, int] = {}
    n = 0
    with dmi.attach(model, spec):
        for prompts, new in calls:
            ids, mask = left_pad(prompts, PAD)
            free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=PAD, eos_token_id=319)
            width = ids.shape[1]
            gen = free[:, width:].flatten().tolist()
            eos = gen[eos_pick % len(gen)] if eos_pick and gen else 319  # some calls end requests at EOS
            outs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=PAD, eos_token_id=eos)
            for b, seq in enumerate(fed_sequences(outs, prompts, {eos})):
                expected[str(n + len(prompts) + b)] = seq  # the free run took ids n..n+B-1 first
                starts[str(n + len(prompts) + b)] = len(prompts[b])
            n += 2 * len(prompts)
    run = dmi.open(out)
    assert run.complete
    assert_books_balance(run.stats)
    assert run.stats["rows"]["dropped"] == len(run.gaps())  # every dropped row is a recorded gap
    if overload == "block":
        assert run.stats["rows"]["dropped"] == 0
    for rid in run.requests:
        if rid not in expected:
            continue  # a free run's request (ids are numbered over both runs of each call)
        seq = expected[rid]
        ref = reference(model, seq)
        for hook in run.hooks:
            pos = run.positions(hook, rid)
            assert not len(pos) or int(pos.max()) < len(seq), (rid, hook)
            if hook == "hook_logits":
                assert all(int(p) >= starts[rid] - 1 for p in pos), (rid, pos)
            got = run.get(hook, rid)
            if len(pos):
                assert (got - ref[hook][pos]).abs().max() < 1e-4, (rid, hook)
