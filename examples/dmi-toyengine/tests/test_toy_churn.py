"""Random churn on the toy engine: requests arrive at random steps with random lengths into a
continuously batched flat batch, through tiny rings under every overload policy. The books
balance, every dropped row is a recorded gap, and every committed row equals the oracle."""
from __future__ import annotations

import dmi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_oracle import reference

from dmi_toyengine import Engine

HOOKS = ["hook_embed", "blocks.*.hook_resid_post", "blocks.0.attn.hook_q", "hook_logits"]

arrivals = st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(1, 60), min_size=1, max_size=7),
                              st.integers(1, 5)), min_size=1, max_size=6)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(reqs=arrivals, ring=st.sampled_from([2 << 10, 8 << 10, 1 << 20]), max_batch=st.integers(1, 3),
       overload=st.sampled_from(["block", "drop", "degrade"]))
def test_toy_churn_books_balance_and_rows_equal_the_oracle(tmp_path_factory, reqs, ring, max_batch, overload):
    engine = Engine(max_batch=max_batch, seed=0)
    out = str(tmp_path_factory.mktemp("toychurn") / "c.h5")
    spec = {"hooks": HOOKS, "ring": {"bytes": ring}, "overload": overload, "sink": out}
    if overload == "degrade":
        spec["degrade"] = {"fallback": {"hooks": ["hook_logits"], "tokens": "last"}, "high": 0.5, "low": 0.1}
    prompts, generated = {}, {}
    with dmi.attach(engine, spec):
        pending = [(f"r{i}", wait, p, n) for i, (wait, p, n) in enumerate(reqs)]
        while pending or engine.has_unfinished():
            while pending and pending[0][1] <= 0:  # arrivals due now join the waiting queue
                rid, _, p, n = pending.pop(0)
                prompts[rid] = p
                engine.add_request(rid, p, n)
            if pending:
                pending[0] = (pending[0][0], pending[0][1] - 1, *pending[0][2:])
            for req in engine.step():
                generated[req.request_id] = req.generated
    run = dmi.open(out)
    assert run.complete
    stats = run.stats
    for hook, c in stats["hooks"].items():
        assert c["in_flight"] == 0 and c["produced"] == c["filtered"] + c["written"] + c["dropped"], (hook, c)
    assert stats["rows"]["dropped"] == len(run.gaps())
    if overload == "block":  # lossless, but for one hook's rows of one step larger than the ring itself
        assert set(stats["drop_reasons"]) <= {"oversize"}, stats["drop_reasons"]
    assert set(run.requests) <= set(prompts)
    for rid in run.requests:
        seq = prompts[rid] + generated[rid][:-1]
        ref = reference(engine, seq)
        for hook in run.hooks:
            pos = run.positions(hook, rid)
            if len(pos):
                assert int(pos.max()) < len(seq)
                assert (run.get(hook, rid) - ref[hook][pos]).abs().max() < 1e-4, (rid, hook)
