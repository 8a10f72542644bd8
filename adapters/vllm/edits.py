"""Interventions on a vLLM model (dmi.interventions): the edit points' hooks, worker side.

vLLM fuses the residual stream: a decoder layer returns (hidden, residual) and the stream is
their sum, and post_attention_layernorm adds its two arguments before normalising. An edit of
such a sum is written back as a change of its first term: hidden + (edited - sum). Rows no
intervention selects get a change of exactly 0, so they are the engine's own values.
"""
from __future__ import annotations

import torch

from dmi.kernels.edit_op import apply_points

from .tables import VTap, read

EDITABLE_READS = ("out", "out_sum", "in0", "in_sum", "resid_in")


def not_editable(tap: VTap, tp_size: int) -> str | None:
    if tp_size > 1:
        return "interventions on tensor-parallel vLLM engines are not supported yet"
    if tap.method is not None or tap.read not in EDITABLE_READS:
        return f"it is read from a method's return value ({tap.method}), not a tensor the model passes on"
    if tap.view not in (None, "heads", "kv_heads"):
        return "it is a slice of the fused qkv projection; edit hook_z or the residual stream instead"
    return None


def hook(i: int | None, he, dims, sel: torch.Tensor, capture, args, kwargs, out):
    """Forward (pre-)hook of an edited hook; i: its capture index, None when only edited."""
    tap = he.binding.tap
    rows = read(tap, dims, args, kwargs, out)
    if rows is None:
        return None  # the points stay unfired: the step's books record the rows as not applied
    new = apply_points(rows, he.points, sel)
    if i is not None:
        capture(i, rows if he.before else new)
    r = tap.read
    if r == "out":
        first = out[0] if isinstance(out, (tuple, list)) else out
        return _replace_out(out, new.reshape(first.shape))
    if r == "out_sum":
        h = out[0]
        return _replace_out(out, h + (new - rows).reshape(h.shape))
    if r == "in0":
        if args:
            return (new.reshape(args[0].shape), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: new.reshape(kwargs[key].shape)}
    if r == "in_sum":
        a0 = args[0]
        if len(args) < 2 or args[1] is None:
            return (new.reshape(a0.shape), *args[1:]), kwargs
        return (a0 + (new - rows).reshape(a0.shape), *args[1:]), kwargs
    # resid_in: the layer's (positions, hidden, residual)
    in_args = len(args) > 1
    h = args[1] if in_args else kwargs["hidden_states"]
    res = args[2] if len(args) > 2 else kwargs.get("residual")
    h2 = new.reshape(h.shape) if res is None else h + (new - rows).reshape(h.shape)
    if in_args:
        return (args[0], h2, *args[2:]), kwargs
    return args, {**kwargs, "hidden_states": h2}


def _replace_out(out, first: torch.Tensor):
    if isinstance(out, tuple):
        return (first, *out[1:])
    if isinstance(out, list):
        return [first, *out[1:]]
    return first
