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
                prompts.append([int(t) for t in obj["input_ids"]])
            elif isinstance(obj, dict) and "prompt" in obj:
                prompts.append(str(obj["prompt"]))
            else:
                raise ValueError(f"{path}:{n}: expected {{'prompt': str}} or {{'input_ids': [int, ...]}}")
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompts")
    return prompts
