"""Model shapes for the benchmark: a local folder, or a named shape built with random weights."""
from __future__ import annotations

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=128, vocab_size=320),
    # big enough on a CPU that a step is real work, small enough to build in seconds
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1536, vocab_size=8192),
    "qwen3-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, vocab_size=151936),
}


def load_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    if name in SHAPES:
        cfg = Qwen3Config(**SHAPES[name], max_position_embeddings=4096, tie_word_embeddings=False,
                          eos_token_id=None, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        model.generation_config.eos_token_id = None
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device)
    return model.eval()
