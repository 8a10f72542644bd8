"""Turning a module's input/output into the tensor a hook captures (HF side)."""
from __future__ import annotations

import torch

from .tables.base import Dims, Tap


def pick(tap: Tap, args: tuple, kwargs: dict, output) -> torch.Tensor | None:
    if tap.io == "input":
        if tap.index is not None and len(args) > tap.index:
            return args[tap.index]
        if tap.kw is not None and tap.kw in kwargs:
            return kwargs[tap.kw]
        return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if tap.index is None:
        return output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(output, (tuple, list)):
        return output[tap.index] if len(output) > tap.index else None
    return output if tap.index == 0 else None


def view(tap: Tap, x: torch.Tensor, d: Dims) -> torch.Tensor:
    """Shape x as [batch, tokens, *row] (or [batch*tokens, *row] for flat taps)."""
    v = tap.view
    if v is None:
        return x
    if v == "heads":
        return x.unflatten(-1, (d.n_heads, d.head_dim))
    if v == "kv_heads":
        return x.unflatten(-1, (d.n_kv_heads, d.head_dim))
    if v == "pattern":  # [batch, heads, q, k] -> [batch, q, heads, k]
        return x.transpose(1, 2)
    if v.startswith("qkv:"):  # fused projection: [.., 3*hidden] -> the i-th third, as heads
        i = int(v[4:])
        return x.chunk(3, dim=-1)[i].unflatten(-1, (d.n_heads, d.head_dim))
    raise ValueError(f"unknown tap view {v!r}")
