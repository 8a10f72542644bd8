"""`dmi run`: batched generation with capture on, progress shown, summary printed."""
from __future__ import annotations

import sys
import time
from pathlib import Path

DEFAULT_HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]

# Files that make a folder a tokenizer (AutoTokenizer builds an empty one from a model folder
# that has none, which then encodes every text to no tokens at all).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


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


def encode_prompts(prompts, tokenizer) -> list[list[int]]:
    """Token ids of every prompt; text prompts go through `tokenizer`. Refuses an empty prompt
    (a request with no token has nothing to generate from)."""
    seqs = []
    for n, p in enumerate(prompts, 1):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass --tokenizer DIR or give token ids in .jsonl")
            ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"prompt {n} ({p[:40]!r}) encodes to no tokens; every prompt needs at least one")
        else:
            ids = list(p)
            if not ids:
                raise ValueError(f"prompt {n} is empty (no token ids); every prompt needs at least one")
        seqs.append(ids)
    return seqs


def _encode(batch, tokenizer, pad):
    import torch

    seqs = encode_prompts(batch, tokenizer)
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def load_tokenizer(path):
    """The tokenizer in folder `path`, or None when it has none."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir() or not any((p / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
    tok.padding_side = "left"
    return tok


def run(args) -> None:
    import torch

    import dmi
    from dmi.reader.summary import summarize

    from .prompts import read_prompts

    # Every check that can fail on the user's input runs before the output file is created.
    spec = dmi.CaptureSpec.from_file(args.spec) if args.spec else dmi.CaptureSpec(hooks=DEFAULT_HOOKS)
    if args.out:
        spec = spec.model_copy(update={"sink": args.out})
    prompts = read_prompts(args.prompts)
    _check_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        where = f"--tokenizer {args.tokenizer!r}" if args.tokenizer else f"the model folder {args.model!r}"
        raise ValueError(f"{args.prompts!r} holds text prompts, but {where} has no tokenizer files "
                         f"({', '.join(TOKENIZER_FILES[:3])}, ...); pass --tokenizer DIR, or give token ids "
                         f"in a .jsonl file: {{\"input_ids\": [1, 2, 3]}}")
    seqs = encode_prompts(prompts, tokenizer)
    vocab = _vocab_size(args.model)
    bad = [(n, t) for n, s in enumerate(seqs, 1) for t in s if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ValueError(f"prompt {bad[0][0]}: token id {bad[0][1]} is outside the model's vocabulary "
                         f"(0..{vocab - 1 if vocab else '?'})")
    model = _load_model(args.model, getattr(torch, args.dtype), args.attn)
    generate_with_capture(model, tokenizer, seqs, spec, args.max_new_tokens, args.batch_size,
                          sample=args.sample, seed=args.seed, quiet=args.quiet)
    if not args.quiet:
        sink = spec.sink if isinstance(spec.sink, str) else spec.sink.get("path")
        with dmi.open(sink) as captured:
            print(summarize(captured))


def _check_model_dir(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {path!r}: no such folder (dmi run loads a local HF model folder)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"--model {path!r} is not an HF model folder (it has no config.json)")


def _vocab_size(path: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {path!r}: its config.json cannot be read: {e}") from None
    config = getattr(config, "get_text_config", lambda: config)()
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _load_model(path: str, dtype, attn: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ValueError(f"--model {path!r} cannot be loaded: {e}") from None
