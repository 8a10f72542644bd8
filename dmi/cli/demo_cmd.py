"""`dmi demo`: the whole path on a tiny local model, nothing downloaded."""
from __future__ import annotations

DEMO_PROMPTS = [
    "The residual stream carries",
    "Attention heads move information",
    "Deep model inspection, while serving:",
    "Hello",
]


def demo(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import dmi
    from dmi.reader.summary import summarize
    from dmi.tiny import demo_assets

    from .run_cmd import generate_with_capture, load_tokenizer

    model_dir, tok_dir = demo_assets(args.cache)
    print(f"dmi demo: tiny random Qwen3 at {model_dir} (built locally, random weights)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = load_tokenizer(tok_dir)
    spec = dmi.CaptureSpec(hooks=["resid", "attn", "blocks.*.attn.hook_pattern", "mlp", "hook_logits"],
                           sink=args.out)
    generated, _ = generate_with_capture(model, tokenizer, DEMO_PROMPTS, spec, args.max_new_tokens, batch_size=4)
    print("generated (random weights: the tokens are noise; the capture is what matters):")
    for p, ids in zip(DEMO_PROMPTS, generated):
        print(f"  {p!r} -> {len(ids)} tokens {ids[:8]} ...")
    print()
    print(summarize(dmi.open(args.out)))
