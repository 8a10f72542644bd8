"""A decode step whose filters keep the same rows as the step before reuses that step's plan
layout at a new ring offset (Planner._reuse). The reference is the full plan: the same generate
planned from scratch every step must give the same control table, the same hook records and the
same rows in the file, and the rows must equal the unpadded single-sequence forward."""
from __future__ import annotations

import numpy as np
import pytest

import dmi
from dmi.plan.step import Planner
from helpers import assert_books_balance, assert_matches, fed_sequences, left_pad

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
PAD, NO_EOS, NEW = 257, 319, 9
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "hook_logits"]

# name: (spec, how many steps at least keep the rows of the step before and reuse its layout)
SPECS = {
    "all": ({}, NEW - 2),  # every decode step after the first
    "requests": ({"requests": {"ids": ["1", "2"]}}, NEW - 2),
    # a positions filter that starts and stops keeping rows in the middle of the decode
    "positions": ({"tokens": {"positions": [[0, 2], [7, 10]]}}, 1),
    # rows that change every step: planned in full every step
    "every": ({"tokens": {"every": 3}}, 0),
    "steps": ({"steps": {"stride": 2}}, 0),
    # a served engine's planner (per-request masks armed): steps where no request chose its own
    # hooks reuse layouts as an unserved one does; the two where request "1" leaves out
    # blocks.1.attn.hook_z are planned hook by hook, and the step after them in full again
    "served": ({}, NEW - 5),
}


def _served_masks(group, table):
    """bool [hooks, rows] like dmi.serve's RequestTable.masks: request "1" takes every hook
    but blocks.1.attn.hook_z at positions 7 and 8; None (the spec for all) at every other step."""
    if "1" not in table.request_ids:
        return None
    mine = table.request == table.request_ids.index("1")
    if not (mine & np.isin(table.position, [7, 8])).any():
        return None
    out = np.repeat((table.request >= 0)[None], len(HOOKS), axis=0)
    out[1, mine] = False
    return out


def _plan_log(monkeypatch, reuse: bool) -> list:
    """Record, for every step, what the capture op will read: the control table (offsets made
    relative to the frame) and each group's source rows, and the hook records of the frame."""
    log = []
    full = Planner.plan

    def plan(self, step, tables, alive):
        if not reuse:
            self._layout = None  # every step planned in full
        frame = full(self, step, tables, alive)
        base = frame.offset or 0
        ctrl = self.control.ctrl_np.copy()
        on = ctrl[:, 0] == 1
        ctrl[on, 1] -= base
        ctrl[on, 6] -= base
        rows = [self.control.rows_np[self.group_index[g], :frame.tables[g].n_rows].copy() for g in self.groups]
        hooks = [(h.hook, h.src.tolist(), h.produced, h.filtered, h.lost.tolist(), h.nbytes,
                  None if h.offset is None else h.offset - base, h.reason) for h in frame.hooks]
        log.append((step, ctrl, rows, hooks, frame.nbytes, frame.header))
        return frame

    monkeypatch.setattr(Planner, "plan", plan)
    return log


def _generate(load, path, spec: dict, monkeypatch, reuse: bool, served: bool = False):
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    with monkeypatch.context() as m:
        log = _plan_log(m, reuse)
        with dmi.attach(model, dmi.CaptureSpec(hooks=HOOKS, sink=path, **spec)) as session:
            if served:
                session.planner.enable_request_masks(_served_masks)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=PAD, eos_token_id=NO_EOS)
    return model, log, fed_sequences(gen, PROMPTS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_reused_plans_equal_full_plans(name, load, tmp_path, monkeypatch):
    reused = []
    orig = Planner._reuse

    def counting(self, *a, **k):
        reused.append(a[1])
        return orig(self, *a, **k)

    spec, steady = SPECS[name]
    monkeypatch.setattr(Planner, "_reuse", counting)
    served = name == "served"
    model, fast, seqs = _generate(load, str(tmp_path / "fast.h5"), spec, monkeypatch, reuse=True, served=served)
    monkeypatch.setattr(Planner, "_reuse", orig)
    _, slow, seqs2 = _generate(load, str(tmp_path / "slow.h5"), spec, monkeypatch, reuse=False, served=served)
    assert seqs == seqs2
    assert len(reused) >= steady, f"only {len(reused)} steps reused a layout"
    assert len(fast) == len(slow) == NEW
    for (s1, c1, r1, h1, n1, hd1), (s2, c2, r2, h2, n2, hd2) in zip(fast, slow):
        assert s1 == s2
        assert np.array_equal(c1, c2), f"step {s1}: control tables differ"
        assert all(np.array_equal(a, b) for a, b in zip(r1, r2)), f"step {s1}: source rows differ"
        assert h1 == h2, f"step {s1}: hook records differ"
        assert (n1, hd1) == (n2, hd2)
    a, b = dmi.open(str(tmp_path / "fast.h5")), dmi.open(str(tmp_path / "slow.h5"))
    assert_books_balance(a.stats)
    assert a.stats["hooks"] == b.stats["hooks"]
    assert a.requests == b.requests
    for rid in a.requests:
        for hook in HOOKS:
            assert a.positions(hook, rid).tolist() == b.positions(hook, rid).tolist()
            assert np.array_equal(a.get(hook, rid).numpy(), b.get(hook, rid).numpy())
    if served:  # the masked steps left request 1's hook_z rows out, as gaps of nothing: filtered
        z = a.positions("blocks.1.attn.hook_z", "1").tolist()
        assert 7 not in z and 8 not in z and 6 in z and 9 in z
        assert a.positions("blocks.1.hook_resid_post", "1").tolist() == list(range(len(seqs[1])))
    if name == "all":  # and the rows are the model's: the unpadded single-sequence forward
        for rid, seq in enumerate(seqs):
            assert_matches(a, model, str(rid), seq, HOOKS, logits_from=len(PROMPTS[rid]) - 1)


def test_a_reused_layout_moves_with_the_ring(load, tmp_path, monkeypatch):
    """A ring a few frames long wraps many times: each reused plan gets its own offset and the
    rows stay exact (block: nothing dropped)."""
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    path = str(tmp_path / "wrap.h5")
    offsets = []
    orig = Planner._reuse

    def reuse(self, *a, **k):
        frame = orig(self, *a, **k)
        offsets.append(frame.offset)
        return frame

    monkeypatch.setattr(Planner, "_reuse", reuse)
    hooks = HOOKS[:1] + HOOKS[2:3]
    with dmi.attach(model, dmi.CaptureSpec(hooks=hooks, sink=path, ring={"bytes": 1 << 14})):
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             pad_token_id=PAD, eos_token_id=NO_EOS)
    run = dmi.open(path)
    assert_books_balance(run.stats)
    assert run.stats["rows"]["dropped"] == 0
    assert len(offsets) >= 30 and None not in offsets
    assert any(b < a for a, b in zip(offsets, offsets[1:])), "the ring never wrapped"
    for rid, seq in enumerate(fed_sequences(gen, PROMPTS)):
        assert_matches(run, model, str(rid), seq, HOOKS[:1] + HOOKS[2:3])
