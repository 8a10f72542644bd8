"""SGLang engine tests: a real sglang.Engine on CPU, checked against HF forward hooks."""
from __future__ import annotations

import pytest
import sglang_env  # noqa: F401  (sets the environment before sglang is imported)


@pytest.fixture(scope="session")
def sgl_tiny(tmp_path_factory):
    """Tiny models for SGLang. Qwen3-MoE: every layer sparse, as SGLang 0.5.23 builds it.
    Qwen2: head_dim equal to hidden/heads, because SGLang 0.5.23's Qwen2 fails otherwise
    (a [tokens, kv_heads, hidden/heads] value into a head_dim-wide cache), with or without dmi."""
    from dmi.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("sgl-tiny")

    def make(family):
        extra = {"qwen3_moe": {"mlp_only_layers": []},
                 "qwen2": {"num_attention_heads": 2, "num_key_value_heads": 1}}.get(family, {})
        return build_tiny_model(family, root / family, **extra)

    return make


@pytest.fixture(scope="session")
def hf_model(sgl_tiny):
    import torch
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(family):
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(sgl_tiny(family), attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
        return cache[family]

    return load
