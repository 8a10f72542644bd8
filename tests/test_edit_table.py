"""The per-step edit table (dmi/plan/edits.py): filled per step, reset between steps, refused
(never silently partial) when a fixed table is too small."""
from __future__ import annotations

import numpy as np
import pytest

from dmi.plan.edits import EditPlanner, InterventionError
from dmi.plan.rows import PREFILL, RowTable
from dmi.policies import RowFilter
from dmi.spec import RequestFilter, StepFilter, TokenFilter


class _F:
    def __init__(self, ids=None, positions=None):
        self.requests, self.tokens = RequestFilter(ids=ids), TokenFilter(positions=positions)
        self.steps, self.degrade = StepFilter(), None


def _rows(n_req: int, t: int) -> RowTable:
    return RowTable(batch=n_req, tokens=t, request_ids=[f"r{i}" for i in range(n_req)],
                    request=np.repeat(np.arange(n_req, dtype=np.int32), t),
                    position=np.tile(np.arange(t, dtype=np.int64), n_req), phase=np.full(n_req * t, PREFILL, np.int8))


def _planner(capacity=8, grows=True):
    filters = [RowFilter(_F(ids=["r1"])), RowFilter(_F(positions=[[1, 2]]))]
    sources = [None, np.array([0, 1, 5])]  # the second patches from stored positions 0, 1, 5
    return EditPlanner(filters, sources, [[0], [1, 2]], "cpu", capacity, grows)


def test_each_point_gets_its_rows_and_value_rows():
    p = _planner()
    applied = p.plan(0, _rows(3, 2))
    assert [a.tolist() for a in applied] == [[2, 3], [1, 3, 5]]
    sel = p.table.sel.numpy()
    assert sel[:6, 0].tolist() == [-1, -1, 0, 0, -1, -1]
    assert sel[:6, 1].tolist() == sel[:6, 2].tolist() == [-1, 1, -1, 1, -1, 1]  # stored row of position 1
    p.plan(1, _rows(1, 2))  # a smaller step: rows of the last one are reset
    assert (sel[2:6] == -1).all()
    p.disarm()
    assert (sel == -1).all()


def test_a_fixed_table_refuses_a_step_it_cannot_hold():
    p = _planner(capacity=4, grows=False)
    p.plan(0, _rows(2, 2))
    with pytest.raises(InterventionError, match="refused rather than run unsteered"):
        p.plan(1, _rows(3, 2))
    grown = _planner(capacity=4, grows=True)
    grown.plan(0, _rows(3, 2))
    assert grown.table.capacity >= 6
