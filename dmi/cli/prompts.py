"""Reading prompt files: plain text (a prompt a line) or JSONL (text or token ids)."""
from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str) -> list[str | list[int]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    prompts: list[str | list[int]] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if isinstance(obj, dict) and "input_ids" in obj:
                ids = obj["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ValueError(f"{path}:{n}: input_ids must be a list of integer token ids")
                if not ids:
                    raise ValueError(f"{path}:{n}: empty prompt (input_ids is []); every prompt needs a token")
                prompts.append(ids)
            elif isinstance(obj, dict) and "prompt" in obj:
                if not isinstance(obj["prompt"], str) or not obj["prompt"]:
                    raise ValueError(f"{path}:{n}: 'prompt' must be non-empty text, got {obj['prompt']!r}")
                prompts.append(obj["prompt"])
            else:
                raise ValueError(f"{path}:{n}: expected {{'prompt': str}} or {{'input_ids': [int, ...]}}")
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompts")
    return prompts
