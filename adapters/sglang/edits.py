"""Interventions on an SGLang model (dmi.interventions): the edit points' hooks, scheduler side.

SGLang carries the residual stream into the next fused add-norm, `norm(hidden, residual) ->
(normed, hidden + residual)`, where dmi reads it (tables/base.py). An edit of that stream must
reach the norm's input, not its returned sum (the normed half is computed from the input): it is
a pre-hook on the norm that changes `hidden` by (edited - sum), so the norm, the residual it
carries on, and a capture of the sum all see the edited stream. Rows no intervention selects
get a change of exactly 0.
"""
from __future__ import annotations

import torch

from dmi.errors import SpecError
from dmi.kernels.edit_op import apply_points

EDITABLE_VIEWS = (None, "heads", "kv_heads", "rows_heads", "rows_kv_heads")


def site(b) -> tuple[str, str, str] | str:
    """(module, "input"|"output", mode) where binding b is edited, or why it cannot be."""
    w = b.where
    if b.tap.view not in EDITABLE_VIEWS:
        return f"it is a view ({b.tap.view!r}) of a fused tensor, not a tensor the model passes on"
    if w.io == "output" and w.index == 1:
        return w.module, "input", "sum"
    if w.io == "input" and w.index == 0:
        return w.module, "input", "arg0"
    if w.io == "output" and w.index in (None, 0):
        return w.module, "output", "out"
    return f"it is read from {w.module}:{w.io}[{w.index}], which dmi cannot write back"


def check(edits) -> None:
    """What SGLang cannot do that the spec asked: a capture before an edit made at the norm's
    input (the capture reads the norm's output, after it)."""
    for he in edits.hooks.values():
        where = site(he.binding)
        if he.before and not isinstance(where, str) and where[2] == "sum":
            k = he.points[0].k
            raise SpecError(f"interventions[{k}].capture", f"on SGLang {he.name} is edited at the input of "
                                                           f"{where[0]} and captured at its output: a capture there "
                                                           f"sees the edit; use capture 'after'")


def hook(adapter, he, mode: str, view, args, kwargs, output):
    try:
        return _edit(adapter, he, mode, view, args, kwargs, output)
    except Exception as e:  # an exception here would take the scheduler down; the books record the rows
        adapter.failed(f"intervention at {he.name}", e)
        return None


def _edit(adapter, he, mode, view, args, kwargs, output):
    s = adapter.session
    if s is None or s.edits is None:
        return None
    sel = s.edits.sel
    if mode == "out":
        first = output[0] if isinstance(output, (tuple, list)) else output
        rows = view(first)
        new = apply_points(rows, he.points, sel).reshape(first.shape)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new
    x = args[0] if args else kwargs["x"]
    if mode == "arg0":
        new = apply_points(view(x), he.points, sel).reshape(x.shape)
    else:  # sum: hidden + residual (+ post_residual_addition)
        res = args[1] if len(args) > 1 else kwargs.get("residual")
        total = x if res is None else x + res
        extra = kwargs.get("post_residual_addition")
        if res is not None and extra is not None:
            total = total + extra
        rows = view(total)
        edited = apply_points(rows, he.points, sel)
        new = edited.reshape(x.shape) if res is None else x + (edited - rows).reshape(x.shape)
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "x": new}
