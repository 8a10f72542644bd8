"""Served requests' interventions: one value bank per steerable hook, armed at launch.

A served engine cannot know at attach which requests will steer, so each hook the operator's
policy lets clients steer (dmi/serve/policy.py) gets one edit point of kind "bank": an affine
per slot, values [2, slots, *row] = (A, B), row i of a step becoming x * A[s] + B[s] where s
is its request's slot (kernels/edit_op.py). The storage never moves, so compiled graphs and
CUDA graphs replay it; only its contents and the edit table change, before each forward.

A request's edits of one hook compose into one affine (add: B += v; scale: both times s; set:
A = 0, B = v; zero: A = B = 0, on chosen heads only when given). Slots are a cache keyed by
the request's uid (shared by its prompts and choices): a uid in this step without one gets a
free slot, else the least recently used slot of a uid not in this step, and its values are
written there. The front end admits no more intervening requests at a time than there are
slots, so a step never lacks one; if one did, its rows are booked as failed ("no_slot"), never
silently run unsteered.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

log = logging.getLogger("dmi")

OPS = ("add", "set", "scale", "zero")


class Banks:
    def __init__(self, bindings, slots: int, device, first_col: int, first_k: int):
        self.names = [b.name for b in bindings]
        self.index = {n: j for j, n in enumerate(self.names)}
        self.shapes = [tuple(b.row_shape) for b in bindings]
        self.values = [torch.zeros((2, slots, *s), dtype=b.dtype, device=device) for s, b in zip(self.shapes, bindings)]
        if torch.device(device).type == "cuda":  # a CUDA graph reads them where they were recorded
            for v in self.values:
                torch._dynamo.mark_static_address(v)
        self.cols = first_col + np.arange(len(bindings))
        self.first_k = first_k
        self.n_slots = slots
        self.owner: list[str | None] = [None] * slots
        self.slot_of: dict[str, int] = {}
        self.last: list[int] = [-1] * slots
        self._prepared: OrderedDict[str, dict | str] = OrderedDict()
        self.lookup = None   # row name -> dmi.serve.engine.Served (the RequestTable's), once served
        self.books = None    # dmi.interventions.books.Books, set by Edits

    # -- per request, on the engine's thread ---------------------------------------------------
    def prepare(self, uid: str, ivs: list[dict]) -> dict | str:
        """{hook index: (TokenMask | None, A, B)} for a request's interventions, or why not."""
        got = self._prepared.get(uid)
        if got is not None:
            self._prepared.move_to_end(uid)
            return got
        try:
            got = self._compose(ivs)
        except Exception as e:  # the front end checked them; a mismatch is a bug: say so, book it
            log.error("dmi: request %s: its interventions cannot be applied: %s", uid, e)
            got = f"{type(e).__name__}: {e}"
        self._prepared[uid] = got
        while len(self._prepared) > 4 * self.n_slots + 16:
            self._prepared.popitem(last=False)
        return got

    def _compose(self, ivs: list[dict]) -> dict:
        from dmi.policies.filters import TokenMask
        from dmi.spec import TokenFilter

        out: dict[int, list] = {}
        for iv in ivs:
            j = self.index.get(iv["hook"])
            if j is None:
                raise ValueError(f"hook {iv['hook']!r} has no bank on this engine")
            shape, op = self.shapes[j], iv["op"]
            if j not in out:
                tokens = iv.get("tokens")
                mask = TokenMask(TokenFilter.model_validate(tokens)) if tokens is not None else None
                out[j] = [mask, torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)]
            e = out[j]
            if op == "add":
                e[2] = e[2] + _vector(iv["value"], shape) * (iv.get("scale") if iv.get("scale") is not None else 1.0)
            elif op == "set":
                e[1], e[2] = torch.zeros(shape, dtype=torch.float64), _vector(iv["value"], shape)
            elif op == "scale":
                e[1], e[2] = e[1] * float(iv["scale"]), e[2] * float(iv["scale"])
            elif op == "zero":
                keep = torch.zeros(shape, dtype=torch.float64)
                if iv.get("heads") is not None:
                    keep += 1
                    keep[list(iv["heads"])] = 0
                e[1], e[2] = e[1] * keep, e[2] * keep
            else:
                raise ValueError(f"op {op!r} is not served; one of {', '.join(OPS)}")
        dtypes = [v.dtype for v in self.values]
        return {j: (m, a.to(dtypes[j]), b.to(dtypes[j])) for j, (m, a, b) in out.items()}

    def _slot(self, uid: str, prep: dict, present: set[str], step: int) -> int | None:
        s = self.slot_of.get(uid)
        if s is None:
            free = [i for i, o in enumerate(self.owner) if o is None or o not in present]
            if not free:
                return None
            s = min(free, key=lambda i: (self.owner[i] is not None, self.last[i]))
            old = self.owner[s]
            if old is not None:
                self.slot_of.pop(old, None)
            self.owner[s], self.slot_of[uid] = uid, s
            for j, (_, a, b) in prep.items():  # outside the forward, ordered before it on its stream
                self.values[j][0, s].copy_(a)
                self.values[j][1, s].copy_(b)
        self.last[s] = step
        return s

    def release(self, uid: str) -> None:
        """The request ended: its slot and its prepared values are free for others."""
        s = self.slot_of.pop(uid, None)
        if s is not None:
            self.owner[s] = None
        self._prepared.pop(uid, None)

    # -- per step, outside the forward ----------------------------------------------------------
    def _requests(self, rows) -> list[tuple[int, object]]:
        if self.lookup is None:
            return []
        out = []
        for r, name in enumerate(rows.request_ids):
            s = self.lookup(name)
            if s is not None and s.interventions and s.uid:
                out.append((r, s))
        return out

    def rows_of(self, rows, r: int, prep: dict) -> dict[int, np.ndarray]:
        mine = rows.request == r
        return {j: np.flatnonzero(mine if m is None else m(rows, mine)) for j, (m, _, _) in prep.items()}

    def plan(self, step: int, rows, host: np.ndarray) -> list[np.ndarray]:
        """Point each intervening request's rows at its slot in this step's edit table; returns,
        per bank, the rows it edits. Rows that cannot be edited are booked as failed here."""
        applied: list[list[np.ndarray]] = [[] for _ in self.names]
        reqs = self._requests(rows)
        present = {s.uid for _, s in reqs}
        for r, s in reqs:
            prep = self.prepare(s.uid, s.interventions)
            if isinstance(prep, str):
                self._fail(rows, r, "invalid")
                continue
            slot = self._slot(s.uid, prep, present, step)
            for j, on in self.rows_of(rows, r, prep).items():
                if slot is None:
                    self._book(j, rows, on, "no_slot")
                    continue
                host[on, self.cols[j]] = slot
                applied[j].append(on)
        return [np.concatenate(a) if a else np.zeros(0, np.int64) for a in applied]

    def skipped(self, rows, reason: str) -> None:
        """Positions of a one-request table the engine did not compute: not edited, under `reason`."""
        for r, s in self._requests(rows):
            prep = self.prepare(s.uid, s.interventions)
            if isinstance(prep, str):
                self._fail(rows, r, "invalid")
                continue
            for j, on in self.rows_of(rows, r, prep).items():
                self._book(j, rows, on, reason)

    def _fail(self, rows, r: int, reason: str) -> None:
        on = np.flatnonzero(rows.request == r)
        hooks = {self.index.get(iv.get("hook")) for iv in self.lookup(rows.request_ids[r]).interventions}
        for j in sorted(hooks - {None}):
            self._book(j, rows, on, reason)

    def _book(self, j: int, rows, on: np.ndarray, reason: str) -> None:
        if len(on) and self.books is not None:
            self.books.record(self.first_k + j, rows.request_ids, rows.request[on], rows.position[on], reason)


def _vector(value, shape) -> torch.Tensor:
    t = torch.tensor(value, dtype=torch.float64).reshape(-1)
    n = int(np.prod(shape))
    if t.numel() != n:
        raise ValueError(f"a value of {t.numel()} numbers for rows of {n}")
    return t.reshape(shape)
