"""Tiny random models and a byte-level tokenizer, built locally (nothing is downloaded).

Used by `dmi demo`, the tests and the benchmark's `tiny` shape.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

FAMILIES = ("qwen3", "qwen3_moe", "llama", "mistral", "qwen2", "gpt2")
BYTE_VOCAB = 256
SPECIALS = ("<|endoftext|>", "<|pad|>")
VOCAB = 320  # bytes, specials, and spare ids


def tiny_config(family: str, **overrides):
    import transformers as tf

    # head_dim 32: the smallest the vLLM CPU attention accepts, so one model serves every engine.
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB + 1,
                  bos_token_id=None, tie_word_embeddings=False)
    if family == "gpt2":
        cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=512,
                   eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB + 1, bos_token_id=BYTE_VOCAB,
                   tie_word_embeddings=False)
        cfg.update(overrides)
        return tf.GPT2Config(**cfg)
    common.update(num_key_value_heads=2, head_dim=32, intermediate_size=128)
    cls = {"qwen3": tf.Qwen3Config, "llama": tf.LlamaConfig, "mistral": tf.MistralConfig,
           "qwen2": tf.Qwen2Config, "qwen3_moe": tf.Qwen3MoeConfig}.get(family)
    if cls is None:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    if family == "qwen3_moe":
        # layer 0 dense, layer 1 sparse: both kinds of MLP in one tiny model
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                      mlp_only_layers=[0], norm_topk_prob=True)
    common.update(overrides)
    return cls(**common)


def build_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of `family` (float32, safetensors) to out_dir; returns the folder."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init is ~N(0, 0.02): scale the weights up so activations differ clearly between
    # positions and requests, which makes attribution mistakes visible in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    model.save_pretrained(out)
    return out


def build_byte_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A byte-level tokenizer: ids 0-255 are bytes, then <|endoftext|> (256) and <|pad|> (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return out
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable char; order the vocab by byte value.
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1],
                                   padding_side="left")
    fast.save_pretrained(out)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-to-printable-character map, which the ByteLevel pre-tokenizer uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def demo_assets(cache_dir: str | os.PathLike | None = None, family: str = "qwen3") -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of the demo, built once in the cache folder."""
    from dmi import __version__

    root = Path(cache_dir or os.environ.get("DMI_CACHE") or Path.home() / ".cache" / "dmi") / f"demo-{__version__}"
    model = build_tiny_model(family, root / f"tiny-{family}")
    tok = build_byte_tokenizer(root / "byte-tokenizer")
    return model, tok
