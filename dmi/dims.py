"""A model's dimensions, read from its HF-style config.

Every engine dmi supports loads the same config.json, so every adapter's architecture tables
size their rows from these (adapters may not import each other; this is their shared ground).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    n_experts: int = 0
    top_k: int = 0



def q_row(d: Dims) -> tuple[int, int]:
    """One token's row of query heads (also the attention output z): [heads, head_dim]."""
    return (d.n_heads, d.head_dim)


def kv_row(d: Dims) -> tuple[int, int]:
    """One token's row of key or value heads: [kv_heads, head_dim]."""
    return (d.n_kv_heads, d.head_dim)


def llama_like_dims(cfg) -> Dims:
    heads = cfg.num_attention_heads
    return Dims(
        n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        n_heads=heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        intermediate=getattr(cfg, "intermediate_size", 0) or 0,
        vocab=cfg.vocab_size,
        n_experts=getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0) or 0,  # (Mixtral)
        top_k=getattr(cfg, "num_experts_per_tok", 0) or 0,
    )
