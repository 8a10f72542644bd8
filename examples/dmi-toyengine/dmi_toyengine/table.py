"""The toy engine's architecture table: canonical hook suffix -> where in the model to read it.

Data, not code, as in dmi's HF tables: a module path relative to `engine.model` ("{L}" is the
layer), its input or its output, and how to view the tensor as one row per token. Every
module here sees the flat batch, so every tensor's leading dim is the step's token count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal


@dataclass(frozen=True)
class Dims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Tap:
    module: str                                # dotted path under engine.model; "{L}" is the layer
    io: Literal["output", "input"] = "output"
    index: int = 0                             # positional argument, for inputs
    view: Literal["heads", "kv_heads"] | None = None   # split the last dim into [head, head_dim]
    shape: Callable[[Dims], tuple[int, ...]] = lambda d: (d.hidden,)


@dataclass(frozen=True)
class ToyTable:
    arch: str                                  # ToyConfig.arch it serves
    taps: dict[str, Tap]
    dims: Callable[[object], Dims]


def toy_dims(cfg) -> Dims:
    return Dims(n_layers=cfg.n_layers, hidden=cfg.hidden, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, intermediate=cfg.intermediate, vocab=cfg.vocab_size)


def _q(d: Dims) -> tuple[int, ...]:
    return (d.n_heads, d.head_dim)


def _kv(d: Dims) -> tuple[int, ...]:
    return (d.n_kv_heads, d.head_dim)


L = "blocks.{L}"

# attn.hook_pattern is left out: the engine never materialises per-request probabilities in a
# module output, and a pattern row's width differs per request in a flat batch.
TABLE = ToyTable(
    arch="toy-llama",
    dims=toy_dims,
    taps={
        "hook_embed": Tap("embed"),
        "hook_resid_pre": Tap(L, io="input"),
        # q/k are read from the projections, i.e. before rotary, as dmi's decisions specify.
        "attn.hook_q": Tap(L + ".attn.q_proj", view="heads", shape=_q),
        "attn.hook_k": Tap(L + ".attn.k_proj", view="kv_heads", shape=_kv),
        "attn.hook_v": Tap(L + ".attn.v_proj", view="kv_heads", shape=_kv),
        "attn.hook_z": Tap(L + ".attn.o_proj", io="input", view="heads", shape=_q),
        "hook_attn_out": Tap(L + ".attn"),
        "hook_resid_mid": Tap(L + ".ln2", io="input"),
        "mlp.hook_post": Tap(L + ".mlp.down_proj", io="input", shape=lambda d: (d.intermediate,)),
        "hook_mlp_out": Tap(L + ".mlp"),
        "hook_resid_post": Tap(L),
        "ln_final.hook_out": Tap("norm"),
        "hook_logits": Tap("lm_head", shape=lambda d: (d.vocab,)),
    },
)
