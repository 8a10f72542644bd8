"""Each row filter keeps exactly the rows an independent computation says it should."""
from __future__ import annotations

import hashlib

import pytest

import dmi
from helpers import assert_books_balance, fed_sequences, left_pad

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37], [41, 42]]
PAD, NO_EOS, NEW = 257, 319, 4


def _capture(load, out, **spec):
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.1.hook_resid_post"], sink=out, **spec)):
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=PAD, eos_token_id=NO_EOS)
    run = dmi.open(out)
    assert_books_balance(run.stats)
    return model, run, fed_sequences(gen, PROMPTS)


def _expected(seqs, mode):
    """Step 0 is the prefill (prompt positions), step k>0 computes position len(prompt)+k-1."""
    out = {}
    for rid, seq in enumerate(seqs):
        p = len(PROMPTS[rid])
        steps = {0: list(range(p))} | {k: [p + k - 1] for k in range(1, len(seq) - p + 1)}
        keep = []
        for step, pos in steps.items():
            if mode == "all" or (mode == "prefill" and step == 0) or (mode == "decode" and step > 0):
                keep += pos
            elif mode == "last":
                keep.append(pos[-1])
        out[str(rid)] = keep
    return out


@pytest.mark.parametrize("mode", ["prefill", "decode", "last"])
def test_token_modes(mode, load, out):
    model, run, seqs = _capture(load, out, tokens=mode)
    exp = _expected(seqs, mode)
    hook = "blocks.1.hook_resid_post"
    total = sum(len(s) for s in seqs)
    assert run.stats["hooks"][hook]["filtered"] == total - sum(map(len, exp.values()))
    for rid, seq in enumerate(seqs):
        assert run.positions(hook, str(rid)).tolist() == exp[str(rid)]
        got, ref_all = run.get(hook, str(rid)), None
        from reference import reference

        ref_all = reference(model, seq)[hook]
        assert (got - ref_all[exp[str(rid)]]).abs().max() < 1e-4


def test_request_ids_and_hash_sampling(load, out, tmp_path):
    _, run, seqs = _capture(load, out, requests={"ids": ["1", "3"]})
    hook = "blocks.1.hook_resid_post"
    assert [r for r in run.requests if len(run.positions(hook, r))] == ["1", "3"]
    assert run.stats["hooks"][hook]["filtered"] == len(seqs[0]) + len(seqs[2])

    out2 = str(tmp_path / "s.h5")
    _, run2, _ = _capture(load, out2, requests={"sample": 0.5, "seed": 7})

    def chosen(r):  # independent statement of the sampling rule
        h = hashlib.blake2b(f"7:{r}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 < 0.5

    kept = [r for r in run2.requests if len(run2.positions(hook, r))]
    assert kept == [r for r in ["0", "1", "2", "3"] if chosen(r)]


def test_step_stride_and_warmup(load, out):
    _, run, seqs = _capture(load, out, steps={"stride": 2, "warmup": 1})
    hook = "blocks.1.hook_resid_post"
    kept_steps = {1, 3}  # steps 0..NEW-1 -> warmup skips 0, stride 2 keeps 1, 3
    for rid, seq in enumerate(seqs):
        p = len(PROMPTS[rid])
        want = [p + k - 1 for k in sorted(kept_steps)]
        assert run.positions(hook, str(rid)).tolist() == want
        assert set(run.steps(hook, str(rid)).tolist()) == kept_steps


def test_position_ranges_and_every_n(load, out):
    model, run, seqs = _capture(load, out, tokens={"mode": "all", "positions": [[1, 3], [6, 9]], "every": 2})
    hook = "blocks.1.hook_resid_post"
    from reference import reference

    for rid, seq in enumerate(seqs):
        want = [p for p in range(len(seq)) if (1 <= p < 3 or 6 <= p < 9) and p % 2 == 0]
        assert run.positions(hook, str(rid)).tolist() == want
        if want:
            assert (run.get(hook, str(rid)) - reference(model, seq)[hook][want]).abs().max() < 1e-4


def test_request_predicate_from_a_plugin(load, out):
    from dmi.plugins import hookimpl, manager

    class Odd:
        @hookimpl
        def dmi_request_predicates(self):
            return {"odd": lambda rid: int(rid) % 2 == 1}

    plugin = Odd()
    manager().register(plugin)
    try:
        _, run, _ = _capture(load, out, requests={"predicate": "odd"})
        hook = "blocks.1.hook_resid_post"
        assert [r for r in run.requests if len(run.positions(hook, r))] == ["1", "3"]
        with pytest.raises(ValueError, match="requests.predicate.*registered: odd"):
            _capture(load, out + "2", requests={"predicate": "even"})
    finally:
        manager().unregister(plugin)
