"""`dmi run`: batched generation with capture on, progress shown, summary printed."""
from __future__ import annotations

import sys
import time

DEFAULT_HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]


def generate_with_capture(model, tokenizer, prompts, spec, max_new_tokens: int, batch_size: int,
                          sample: bool = False, seed: int = 0, quiet: bool = False, log=sys.stderr):
    """Generate for every prompt in batches (left-padded), capturing per `spec`; returns the generated
    token ids per prompt and the session's final stats."""
    import torch

    import dmi

    pad = tokenizer.pad_token_id if tokenizer is not None else model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, int) else 0
    torch.manual_seed(seed)
    outputs = []
    t0 = time.monotonic()
    with dmi.attach(model, spec, progress=not quiet) as session:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            ids, mask = _encode(batch, tokenizer, pad)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=sample, pad_token_id=pad)
            outputs += gen[:, ids.shape[1]:].tolist()
            if not quiet:
                print(f"dmi: batch {start // batch_size + 1}/{-(-len(prompts) // batch_size)} done "
                      f"({min(start + batch_size, len(prompts))}/{len(prompts)} prompts, "
                      f"{time.monotonic() - t0:.1f}s)", file=log)
        stats = session.stats()
    return outputs, stats


def _encode(batch, tokenizer, pad):
    import torch

    seqs = []
    for p in batch:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass --tokenizer DIR or give token ids in .jsonl")
            seqs.append(tokenizer(p, add_special_tokens=False)["input_ids"])
        else:
            seqs.append(list(p))
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
    tok.padding_side = "left"
    return tok


def run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import dmi
    from dmi.reader.summary import summarize

    from .prompts import read_prompts

    spec = dmi.CaptureSpec.from_file(args.spec) if args.spec else dmi.CaptureSpec(hooks=DEFAULT_HOOKS)
    if args.out:
        spec = spec.model_copy(update={"sink": args.out})
    prompts = read_prompts(args.prompts)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.attn).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    generate_with_capture(model, tokenizer, prompts, spec, args.max_new_tokens, args.batch_size,
                          sample=args.sample, seed=args.seed, quiet=args.quiet)
    if not args.quiet:
        sink = spec.sink if isinstance(spec.sink, str) else spec.sink.get("path")
        print(summarize(dmi.open(sink)))
