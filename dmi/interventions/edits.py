"""Interventions armed on one session: validated at attach, planned every step, booked.

The session builds `Edits` from the spec before touching the engine (so bad input leaves it as
it was); the adapter installs one edit point per (intervention, hook) and at each such hook
applies them in spec order with kernels/edit_op.py, reading this step's table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dmi.errors import SpecError
from dmi.plan.control import ROW_CAPACITY
from dmi.plan.edits import EditPlanner
from dmi.plan.rows import TOKENS, RowTable

from . import values as V
from .books import Books
from .spec import RunValue


@dataclass(eq=False)
class EditPoint:
    k: int                       # the intervention's index in the spec
    slot: int                    # its row of the edit table
    kind: str
    values: torch.Tensor         # [v, *row] in the hook's dtype, on its device
    scale: float
    head_mask: torch.Tensor | None
    fired: bool = False          # its hook ran this step (set by the hook; replayed by compiled code)


@dataclass(eq=False)
class HookEdits:
    """Everything one hook does besides capture: its edit points, in spec order."""

    name: str
    binding: Any
    capture: int | None          # the session's binding index when the hook is also captured
    before: bool                 # a capture here records the value before the edits
    points: list[EditPoint] = field(default_factory=list)


class _Filter:
    """An intervention's requests and tokens in the shape policies.RowFilter reads."""

    def __init__(self, iv):
        from dmi.spec import StepFilter

        self.tokens, self.requests, self.steps, self.degrade = iv.tokens, iv.requests, StepFilter(), None


class Edits:
    def __init__(self, spec, adapter, captured: list[str], predicate: Callable[[str | None], Any],
                 warn: Callable[[str, str], None], device=None, banks: tuple[list[str], int] | None = None):
        """device: where the values and the table live (default the adapter's; a front end that
        only validates passes "cpu"). banks: (hooks, slots) served clients may steer
        (dmi.interventions.banks), from the operator's policy."""
        device = adapter.device if device is None else torch.device(device)
        if not getattr(adapter, "supports_interventions", False):
            raise SpecError("interventions", f"the {adapter.engine_name} adapter cannot apply interventions yet "
                                             f"(supported: hf, vllm, sglang); remove them")
        from dmi.policies import RowFilter

        self.warn = warn
        self.hooks: dict[str, HookEdits] = {}
        filters, sources, slots, entries = [], [], [], []
        n = 0
        for k, iv in enumerate(spec.interventions or []):
            f = f"interventions[{k}]"
            try:
                found = adapter.bind([iv.hook])
            except SpecError as e:
                raise type(e)(f"{f}.hook", str(e).split(": ", 1)[-1]) from None
            if not found:
                raise SpecError(f"{f}.hook", f"{iv.hook!r} selects no hook on this model")
            # a stored run's rows default to each hook's own (a glob reads one set per hook)
            per_hook = isinstance(iv.value, RunValue) and iv.value.hook is None
            shared = (None, None) if iv.value is None or per_hook else V.load(iv.value, f"{f}.value", iv.hook)
            mine = []
            for b in found:
                data, src = V.load(iv.value, f"{f}.value", b.name) if per_hook else shared
                why = _not_editable(adapter, b)
                if why:
                    raise SpecError(f"{f}.hook", f"{b.name} cannot be edited: {why}")
                values, head_mask, pos = _prepare(iv, b, data, src, f, device)
                he = self.hooks.get(b.name)
                if he is None:
                    he = self.hooks[b.name] = HookEdits(b.name, b, captured.index(b.name) if b.name in captured else None,
                                                        iv.capture == "before")
                elif he.before != (iv.capture == "before"):
                    raise SpecError(f"{f}.capture", f"{b.name} already has an intervention capturing "
                                                    f"{'before' if he.before else 'after'} its edits; one hook's "
                                                    f"capture sees one value: give its interventions one 'capture'")
                he.points.append(EditPoint(k, n, iv.op, values, float(iv.scale if iv.scale is not None else 1.0),
                                           head_mask))
                mine.append(n)
                n += 1
            filters.append(RowFilter(_Filter(iv), predicate=predicate(iv.requests.predicate)))
            sources.append(pos)
            slots.append(mine)
            entries.append({"name": iv.name or f"{k}:{iv.op}@{iv.hook}", "hook": iv.hook, "op": iv.op,
                            "hooks": [b.name for b in found], "capture": iv.capture})
        names = [e["name"] for e in entries]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise SpecError("interventions", f"two interventions are named {dup[0]!r}; names must be unique")
        self.banks = self._banks(adapter, banks, captured, n, len(entries), device, entries) if banks else None
        self.points = [p for he in self.hooks.values() for p in he.points]
        # an engine whose compiled graph holds the table for its lifetime sizes it once (vLLM)
        self.planner = EditPlanner(filters, sources, slots, device,
                                   max(ROW_CAPACITY, getattr(adapter, "edit_rows", 0) or 0),
                                   getattr(adapter, "edit_table_grows", True),
                                   extra=len(self.banks.names) if self.banks is not None else 0)
        self.books = Books(entries)
        if self.banks is not None:
            self.banks.books = self.books
        self._step: tuple[RowTable, list[np.ndarray]] | None = None

    def _banks(self, adapter, banks, captured, col, k, device, entries):
        """One bank point per hook served clients may steer, after the spec's points there."""
        from .banks import Banks

        hooks, slots = banks
        field = "dmi_serve.intervention_hooks"
        try:
            found = adapter.bind(hooks)
        except SpecError as e:
            raise SpecError(field, str(e).split(": ", 1)[-1]) from None
        for b in found:
            why = _not_editable(adapter, b)
            if why:
                raise SpecError(field, f"{b.name} cannot be edited: {why}")
        bank = Banks(found, slots, device, col, k)
        for j, b in enumerate(found):
            he = self.hooks.get(b.name)
            if he is None:
                he = self.hooks[b.name] = HookEdits(b.name, b, captured.index(b.name) if b.name in captured else None,
                                                    False)
            he.points.append(EditPoint(k + j, col + j, "bank", bank.values[j], 1.0, None))
            entries.append({"name": f"served@{b.name}", "hook": b.name, "op": "served", "hooks": [b.name],
                            "capture": "before" if he.before else "after"})
        return bank

    @property
    def sel(self) -> torch.Tensor:
        """The edit table [capacity, points] the hooks slice (fixed storage; see dmi.plan.edits)."""
        return self.planner.table.sel

    # -- per step, outside the forward ---------------------------------------------------
    def begin(self, step: int, rows: RowTable) -> None:
        applied = self.planner.plan(step, rows, self.banks.plan if self.banks is not None else None)
        for p in self.points:
            p.fired = False
        self._step = (rows, applied)

    def end(self) -> None:
        """Book the step: rows of an intervention whose hook never ran are recorded as not applied."""
        if self._step is None:
            return
        rows, applied = self._step
        self._step = None
        self.planner.disarm()
        missed = {p.k for p in self.points if not p.fired}
        for k, on in enumerate(applied):
            if not len(on):
                continue
            if k in missed:
                name = self.books.entries[k]["name"]
                self.warn("edit:" + name, f"dmi: intervention {name!r}: its hook did not run in a step that planned "
                                          f"{len(on)} edited rows; those rows are recorded as not applied")
            self.books.record(k, rows.request_ids, rows.request[on], rows.position[on],
                              "not_applied" if k in missed else None)

    def skipped(self, step: int, request_id: str, positions: np.ndarray, reason: str) -> None:
        """Positions of a request the engine did not compute (a prefix cache served them): an
        intervention that selects them could not apply there; book them under `reason`."""
        n = len(positions)
        rows = RowTable(batch=1, tokens=n, request_ids=[request_id], request=np.zeros(n, np.int32),
                        position=np.asarray(positions, np.int64), phase=np.zeros(n, np.int8))
        for k, (on, _) in enumerate(zip(self.planner.rows_of(step, rows), self.books.entries)):
            if len(on):
                name = self.books.entries[k]["name"]
                self.warn("skipped:" + name, f"dmi: intervention {name!r}: {len(on)} rows of request {request_id!r} "
                                             f"were not computed ({reason}), so not edited; they are booked as "
                                             f"failed ({reason}). Disable the prefix cache to steer them")
                self.books.record(k, rows.request_ids, rows.request[on], rows.position[on], reason)
        if self.banks is not None:
            self.banks.skipped(rows, reason)

    def stats(self, per_request: bool = True) -> dict:
        return self.books.snapshot(per_request)


def _not_editable(adapter, b) -> str | None:
    if getattr(b, "group", TOKENS) != TOKENS:
        return "its rows are not the step's token rows (logits are computed per request)"
    if b.row_shape is None or b.dtype is None:
        return "its row layout is known only at run time (module:, HookPoint or attention pattern)"
    return adapter.editable(b)


def _prepare(iv, b, data, src, f: str, device) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]:
    shape, dtype = tuple(b.row_shape), b.dtype
    head_mask = None
    pos = None
    if iv.op == "patch":
        values = V.as_rows(data, shape, dtype, f"{f}.value", b.name, many=True)
        order = np.argsort(src, kind="stable")
        values, pos = values[torch.from_numpy(order)], src[order]
        if len(np.unique(pos)) != len(pos):
            raise SpecError(f"{f}.value", f"the stored run has position(s) twice for this request")
    elif data is not None:
        if src is not None:  # one row of a stored run
            order = np.argsort(src, kind="stable")
            want = iv.value.position
            if want is None:
                at = order[-1]
            elif want < 0:
                if -want > len(order):
                    raise SpecError(f"{f}.value.position", f"{want} reaches before the first of {len(order)} stored rows")
                at = order[want]
            else:
                hit = np.flatnonzero(src == want)
                if not len(hit):
                    raise SpecError(f"{f}.value.position", f"the stored run has no row at position {want}; "
                                                           f"stored: {src.min()}..{src.max()}")
                at = hit[0]
            data = data[int(at)]
        values = V.as_rows(data, shape, dtype, f"{f}.value", b.name, many=False)
        if iv.op == "add" and iv.scale is not None:
            values = values * iv.scale
        elif iv.op == "project_out":
            norm = float(values.double().norm())
            if not norm or not math.isfinite(norm):
                raise SpecError(f"{f}.value", "project_out needs a non-zero direction")
            values = values / values.norm()
    else:
        values = torch.zeros((1, *shape), dtype=dtype)
    if iv.heads is not None:
        if len(shape) != 2:
            raise SpecError(f"{f}.heads", f"per-head zero needs an attention hook with a heads dimension; "
                                          f"{b.name} rows are {shape}")
        bad = [h for h in iv.heads if h >= shape[0]]
        if bad:
            raise SpecError(f"{f}.heads", f"head(s) {bad} out of range: {b.name} has {shape[0]} heads")
        head_mask = torch.zeros((shape[0], 1), dtype=torch.bool)
        head_mask[iv.heads] = True
        head_mask = head_mask.to(device)
    return values.to(device).contiguous(), head_mask, pos
