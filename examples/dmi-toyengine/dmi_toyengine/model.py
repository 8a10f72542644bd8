"""The toy engine's transformer: a Llama-shaped decoder in plain PyTorch.

Every forward runs over a *flat* batch of tokens [num_tokens, hidden] that mixes several
requests (prefill chunks and single decode tokens), as vLLM does; `SeqSlice` says which
rows belong to which request and carries that request's KV cache, so attention is the only
place where requests are told apart. Modules are named so forward hooks can find them:
`embed`, `blocks[i].ln1/attn/ln2/mlp`, `norm`, `lm_head`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 128
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2          # grouped-query attention: each kv head serves n_heads // n_kv_heads queries
    head_dim: int = 16
    intermediate: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    arch: str = "toy-llama"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


@dataclass
class KVCache:
    """One request's keys and values, per layer: [n_kv_heads, cached_tokens, head_dim]."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    def length(self) -> int:
        return int(self.k[0].shape[1]) if self.k else 0


@dataclass(frozen=True)
class SeqSlice:
    """Rows [start, stop) of the flat batch are the next tokens of the request owning `cache`."""

    start: int
    stop: int
    cache: KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE (Llama's convention). x: [tokens, heads, head_dim]; positions: [tokens]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ToyConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.q_proj = nn.Linear(cfg.hidden, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice]) -> torch.Tensor:
        c = self.cfg
        n = x.shape[0]
        q = rotary(self.q_proj(x).view(n, c.n_heads, c.head_dim), positions, c.rope_theta)
        k = rotary(self.k_proj(x).view(n, c.n_kv_heads, c.head_dim), positions, c.rope_theta)
        v = self.v_proj(x).view(n, c.n_kv_heads, c.head_dim)
        z = torch.empty(n, c.n_heads, c.head_dim, dtype=x.dtype, device=x.device)
        # One request at a time: each attends over its own cache plus its new tokens, nothing else.
        for s in seqs:
            z[s.start:s.stop] = self._attend(q[s.start:s.stop], k[s.start:s.stop], v[s.start:s.stop], s.cache)
        return self.o_proj(z.reshape(n, c.n_heads * c.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        c = self.cfg
        k, v = k.transpose(0, 1), v.transpose(0, 1)          # [kv_heads, new, head_dim]
        if len(cache.k) > self.layer:
            k = torch.cat([cache.k[self.layer], k], dim=1)
            v = torch.cat([cache.v[self.layer], v], dim=1)
            cache.k[self.layer], cache.v[self.layer] = k, v
        else:
            cache.k.append(k)
            cache.v.append(v)
        new, total = q.shape[0], k.shape[1]
        past = total - new
        group = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        scores = q.transpose(0, 1) @ k.transpose(1, 2) / c.head_dim ** 0.5   # [heads, new, total]
        # New token i sits at position past + i and sees keys 0..past + i.
        visible = torch.arange(total, device=q.device)[None, :] <= past + torch.arange(new, device=q.device)[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return (probs @ v).transpose(0, 1)                                   # [new, heads, head_dim]


class MLP(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig, layer: int):
        super().__init__()
        self.ln1 = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice]) -> torch.Tensor:
        h = x + self.attn(self.ln1(x), positions, seqs)
        return h + self.mlp(self.ln2(h))


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int) -> None:
        """Random weights from `seed` alone (not the global RNG), scaled so activations stay O(1)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "norm.weight":
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif p.dim() == 2 and name != "embed.weight":
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice]) -> torch.Tensor:
        """tokens, positions: [num_tokens]. Returns logits for every token: [num_tokens, vocab]."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions, seqs)
        # Logits for all rows, not only each request's last: every hook then has one row per
        # token of the step, and the sampler picks the rows it needs.
        return self.lm_head(self.norm(x))


__all__ = ["ToyConfig", "ToyModel", "KVCache", "SeqSlice", "rotary"]
