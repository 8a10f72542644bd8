"""Tiny random configs of 22 HF decoder-only families (nothing downloaded), for tests; plus
variants where one family's blocks differ (Falcon's multi-query and sequential layouts, GPT-NeoX
without the parallel residual)."""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {**MOE, "head_dim": 16, "mlp_only_layers": [0], "norm_topk_prob": True}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "num_key_value_heads": None}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 64, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 64}),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "mixtral": ("MixtralConfig", MOE),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.5}),
    "granite": ("GraniteConfig", {"residual_multiplier": 0.5, "logits_scaling": 4.0, "embedding_multiplier": 3.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "starcoder2": ("Starcoder2Config", {}),
    "qwen2_moe": ("Qwen2MoeConfig", {**MOE, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2, "alibi": False}),
    "falcon_mq": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True,
                                   "alibi": False}),
    "falcon_seq": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": False, "parallel_attn": False,
                                    "alibi": False}),
    "gpt_neox_seq": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": False}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None}),
    "deepseek_v3": ("DeepseekV3Config", {**MOE, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                                         "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1,
                                         "n_group": 1, "topk_group": 1, "head_dim": 8, "num_key_value_heads": 4}),
}


def tiny_family_model(family: str, seed: int = 0, attn: str = "eager", **overrides):
    """A random tiny model of `family`, float32, eval, with norm weights and biases off their defaults.
    `overrides`: config fields over the family's (engine tests widen heads to what engines run)."""
    import transformers as tf

    cls, extra = FAMILIES[family]
    cfg = getattr(tf, cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                for name, p in mod.named_parameters(recurse=False):
                    p.add_(0.3 * torch.randn_like(p))
    return model


# What the vLLM and SGLang CPU builds run: head_dim 32 (vLLM's CPU attention takes no smaller) and
# q/kv heads that split over two tensor-parallel ranks.
ENGINE_DIMS = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                   max_position_embeddings=512)


def save_family_model(family: str, out_dir, seed: int = 0, **overrides):
    """tiny_family_model at engine dimensions, saved for an engine to load (safetensors, float32);
    returns the folder. Norm weights and biases are random, so the engines' fused norms are checked."""
    from pathlib import Path

    out = Path(out_dir)
    if not (out / "config.json").exists():
        tiny_family_model(family, seed=seed, **{**ENGINE_DIMS, **overrides}).save_pretrained(out)
    return out
