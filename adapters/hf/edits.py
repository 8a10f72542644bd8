"""Interventions on an HF model: the edit points' forward hooks (dmi.interventions).

A hook that is edited (and maybe captured) reads its tensor like a capture point, applies its
edit points in spec order with the in-graph op (kernels/edit_op.py, traced into compiled
graphs), captures before or after the edits as the spec says, and hands the edited tensor back
to the model in place of the original.
"""
from __future__ import annotations

import torch

from dmi.kernels.edit_op import apply_points

from . import reading
from .tables.base import Tap

EDITABLE_VIEWS = (None, "heads", "kv_heads")  # pure reshapes of the module's tensor


def not_editable(tap: Tap | None) -> str | None:
    if tap is None:
        return "it has no module tap"
    if tap.fn is not None:
        return "it is recomputed from the module's inputs (not a tensor the model passes on)"
    if tap.cols is not None or tap.grouped is not None or (tap.view or "").startswith("qkv:"):
        return "it is a slice of a fused projection; edit the projection's whole output instead"
    if tap.scale is not None or tap.softcap is not None or tap.view not in EDITABLE_VIEWS:
        return f"it is derived from the module's tensor (view {tap.view!r}), not the tensor itself"
    if tap.ragged:
        return "its rows are ragged (attention pattern)"
    return None


def hook(adapter, i: int | None, he, dims, capture, args, kwargs, output):
    """Forward (pre-)hook of an edited hook; i: its capture index, None when only edited."""
    tap = he.binding.tap
    x = reading.pick(tap, args, kwargs, output)
    edits = adapter.session.edits
    if not isinstance(x, torch.Tensor) or edits is None:
        return None  # the points stay unfired: the step's books record the rows as not applied
    rows = reading.view(tap, x, dims)
    rows = rows if tap.flat else rows.flatten(0, 1)
    new = apply_points(rows, he.points, edits.sel)
    if i is not None:
        capture(adapter, i, he.binding, (rows if he.before else new).detach())
    return put(tap, args, kwargs, output, new.reshape(x.shape))


def put(tap: Tap, args: tuple, kwargs: dict, output, new: torch.Tensor):
    """What the hook returns so the model goes on with `new` in place of the picked tensor."""
    if tap.io == "input":
        if tap.index is not None and len(args) > tap.index:
            return (*args[: tap.index], new, *args[tap.index + 1:]), kwargs
        key = tap.kw if tap.kw is not None and tap.kw in kwargs else next(
            k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, {**kwargs, key: new}
    at = 0 if tap.index is None else tap.index
    if isinstance(output, tuple):
        return (*output[:at], new, *output[at + 1:])
    if isinstance(output, list):
        return [*output[:at], new, *output[at + 1:]]
    return new
