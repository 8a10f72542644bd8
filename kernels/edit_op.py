"""The in-graph edit: per-row interventions as plain torch ops over the step's edit table.

`edit(x, sel, ...)` returns x with each row's edit applied, where `sel` (a slice of a
persistent int64 table the plan rewrites before every forward, dmi/plan/edits.py) says which
value row each tensor row takes, -1 for none. Only tensor ops: a compiled graph traces them
once and a CUDA graph replays them with each step's table; no dmi Python runs at replay. Rows
with no edit are taken from x by torch.where, so they are bit-identical to an unedited forward.
"""
from __future__ import annotations

import torch

KINDS = ("add", "set", "scale", "zero", "project_out", "patch")


def edit(x: torch.Tensor, sel: torch.Tensor, kind: str, values: torch.Tensor, scale: float,
         head_mask: torch.Tensor | None) -> torch.Tensor:
    """x: [n, *row]; sel: int64 [n]; values: [v, *row] in x's dtype (add: already times its
    scale; project_out: the unit direction); head_mask: bool [heads, 1] (zero on some heads).
    "bank" (dmi.interventions.banks): values [2, slots, *row], an affine per slot, sel the slot;
    one affine covers add, set, scale and zero, and a request's several such edits of one hook."""
    n = x.shape[0]
    on = (sel >= 0).view(n, *([1] * (x.dim() - 1)))
    if kind == "bank":  # served requests' edits: values [2, slots, *row], row i takes x * A[sel] + B[sel]
        at = sel.clamp(min=0)
        y = x * values[0].index_select(0, at) + values[1].index_select(0, at)
    elif kind == "add":
        y = x + values[0]
    elif kind == "set":
        y = values[0].expand_as(x)
    elif kind == "patch":
        y = values.index_select(0, sel.clamp(min=0))
    elif kind == "scale":
        y = x * scale
    elif kind == "zero":
        y = torch.zeros_like(x) if head_mask is None else x.masked_fill(head_mask, 0)
    elif kind == "project_out":
        flat, u = x.reshape(n, -1), values[0].reshape(-1)
        y = (flat - (flat @ u).unsqueeze(1) * u).view(x.shape)
    else:
        raise ValueError(f"unknown edit {kind!r}; one of {', '.join(KINDS)}")
    return torch.where(on, y, x)


def reference(x: torch.Tensor, kind: str, value: torch.Tensor | None, scale: float | None,
              heads: list[int] | None) -> torch.Tensor:
    """Plain statement of one row block's edit (every row edited), for tests' oracles."""
    if kind == "add":
        return x + (scale if scale is not None else 1.0) * value
    if kind in ("set", "patch"):
        return value.expand_as(x).clone()
    if kind == "scale":
        return x * scale
    if kind == "zero":
        if heads is None:
            return torch.zeros_like(x)
        y = x.clone()
        y[..., heads, :] = 0
        return y
    if kind == "project_out":
        u = value.reshape(-1) / value.norm()
        flat = x.reshape(-1, u.numel())
        return (flat - (flat @ u)[:, None] * u).reshape(x.shape)
    raise ValueError(kind)


def apply_points(rows_x: torch.Tensor, points, sel: torch.Tensor) -> torch.Tensor:
    """A hook's edit points in spec order on its rows [n, *row]; `sel` is the step's edit table
    [capacity, points]. Marks each point as run (compiled code replays that attribute store)."""
    n = rows_x.shape[0]
    for p in points:
        rows_x = edit(rows_x, sel[:n, p.slot], p.kind, p.values, p.scale, p.head_mask)
        p.fired = True
    return rows_x
