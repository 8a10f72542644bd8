"""Turning a module's input/output into the tensor a hook captures (HF side)."""
from __future__ import annotations

import torch

from .tables.base import Dims, Tap


def pick(tap: Tap, args: tuple, kwargs: dict, output) -> torch.Tensor | None:
    if tap.fn is not None:
        return tap.fn(args, kwargs, output)
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
    if tap.cols is not None:
        x = x[..., tap.cols[0]:tap.cols[1]]
    if tap.scale is not None:
        x = x * tap.scale
    if tap.softcap is not None:
        x = torch.tanh(x / tap.softcap) * tap.softcap
    v = tap.view
    if v is None:
        return x
    if v == "heads":
        return x.unflatten(-1, tap.heads or (d.n_heads, d.head_dim))
    if v == "kv_heads":
        return x.unflatten(-1, tap.heads or (d.n_kv_heads, d.head_dim))
    if v == "grouped":  # [.., groups * per_group * head_dim] -> heads lo:hi of every group
        groups, per_group, lo, hi = tap.grouped
        head_dim = tap.heads[1] if tap.heads else d.head_dim
        return x.unflatten(-1, (groups, per_group, head_dim))[..., lo:hi, :].flatten(-3, -2)
    if v == "heads_first":  # [batch, heads, tokens, dim] -> [batch, tokens, heads, dim]
        return x.transpose(1, 2)
    if v == "pattern":  # [batch, heads, q, k] -> [batch, q, heads, k]
        return x.transpose(1, 2)
    if v.startswith("qkv:"):  # fused projection: [.., 3*hidden] -> the i-th third, as heads
        i = int(v[4:])
        return x.chunk(3, dim=-1)[i].unflatten(-1, (d.n_heads, d.head_dim))
    if v in ("norm_scale", "norm_normalized"):
        return norm_stats(x, tap.eps, tap.centered)[0 if v == "norm_scale" else 1]
    raise ValueError(f"unknown tap view {v!r}")


def norm_stats(x: torch.Tensor, eps: float, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens's hook_scale [.., 1] and hook_normalized: (x - mean) / scale for LayerNorm,
    x / scale for RMSNorm, before the norm's weight and bias; computed in float32, kept in the model's dtype."""
    dtype, x = x.dtype, x.float()
    if centered:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale.to(dtype), (x / scale).to(dtype)
