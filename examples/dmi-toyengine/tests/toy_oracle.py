"""An oracle for the toy engine that shares no code with it or with the adapter.

It recomputes one unpadded sequence from the engine's weights alone: whole-sequence causal
attention (torch's SDPA, no KV cache, no flat batch, no per-request loop) and its own RMSNorm
and rotary, returning every hook as [len(seq), ...]. Agreement with the capture therefore checks
the adapter's attribution and the engine's cache and batching at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [heads, seq, head_dim]; positions 0..seq-1, rotate-half convention."""
    seq, d = x.shape[1], x.shape[2]
    ang = torch.outer(torch.arange(seq, dtype=torch.float32), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * cos + half * sin


@torch.no_grad()
def reference(engine, seq: list[int]) -> dict[str, torch.Tensor]:
    cfg, m = engine.config, engine.model
    n, H, K, D = len(seq), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    x = m.embed.weight[torch.tensor(seq)]
    out["hook_embed"] = x
    for i, blk in enumerate(m.blocks):
        p = f"blocks.{i}."
        out[p + "hook_resid_pre"] = x
        h = _rms(x, blk.ln1.weight, cfg.norm_eps)
        q = h @ blk.attn.q_proj.weight.T
        k = h @ blk.attn.k_proj.weight.T
        v = h @ blk.attn.v_proj.weight.T
        out[p + "attn.hook_q"], out[p + "attn.hook_k"] = q.view(n, H, D), k.view(n, K, D)
        out[p + "attn.hook_v"] = v.view(n, K, D)
        qh = _rope(q.view(n, H, D).transpose(0, 1), cfg.rope_theta)
        kh = _rope(k.view(n, K, D).transpose(0, 1), cfg.rope_theta).repeat_interleave(H // K, dim=0)
        vh = v.view(n, K, D).transpose(0, 1).repeat_interleave(H // K, dim=0)
        z = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1)   # [n, H, D]
        out[p + "attn.hook_z"] = z
        attn = z.reshape(n, H * D) @ blk.attn.o_proj.weight.T
        out[p + "hook_attn_out"] = attn
        x = x + attn
        out[p + "hook_resid_mid"] = x
        h = _rms(x, blk.ln2.weight, cfg.norm_eps)
        post = F.silu(h @ blk.mlp.gate_proj.weight.T) * (h @ blk.mlp.up_proj.weight.T)
        out[p + "mlp.hook_post"] = post
        mlp = post @ blk.mlp.down_proj.weight.T
        out[p + "hook_mlp_out"] = mlp
        x = x + mlp
        out[p + "hook_resid_post"] = x
    normed = _rms(x, m.norm.weight, cfg.norm_eps)
    out["ln_final.hook_out"] = normed
    out["hook_logits"] = normed @ m.lm_head.weight.T
    return out
