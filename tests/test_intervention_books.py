"""The interventions' books: per-step rows folded into [start, stop) ranges per request."""
from __future__ import annotations

import numpy as np

from dmi.interventions import books as B


def _books():
    return B.Books([{"name": "a", "hook": "h", "op": "add", "hooks": ["h"], "capture": "after"},
                    {"name": "b", "hook": "h", "op": "zero", "hooks": ["h"], "capture": "after"}])


def test_prefill_then_decodes_make_one_range_per_request():
    b = _books()
    b.record(0, ["x", "y"], np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]))  # prefill
    for step in range(3):  # decodes: one row each, request order changes between steps
        b.record(0, ["y", "x"], np.array([0, 1]), np.array([2 + step, 3 + step]))
    b.record(1, ["x"], np.array([0, 0]), np.array([7, 9]), reason="prefix_cache")
    got = b.snapshot()
    assert got["a"]["requests"] == {"x": [[0, 6]], "y": [[0, 5]]} and got["a"]["rows"] == 11
    assert got["b"]["requests"] == {} and got["b"]["failed"] == {"prefix_cache": {"x": [[7, 8], [9, 10]]}}
    assert got["b"]["failed_rows"] == 2
    b.record(0, ["x"], np.array([0]), np.array([6]))
    assert b.snapshot()["a"]["requests"]["x"] == [[0, 7]]  # a later fold extends the range


def test_unread_books_fold_on_their_own(monkeypatch):
    monkeypatch.setattr(B, "FOLD_AFTER", 10)
    b = _books()
    for p in range(25):
        b.record(0, ["x"], np.array([0]), np.array([p]))
    assert len(b._pending) <= 10
    assert b.snapshot()["a"]["requests"] == {"x": [[0, 25]]}
