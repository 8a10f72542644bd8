"""`dmi hooks MODEL_DIR`: what an HF model offers, where each hook is read and how it was found.

Built on the meta device from the folder's config.json: no weights are read, so it is instant
for any model size.
"""
from __future__ import annotations

import re


def add_parser(sub) -> None:
    p = sub.add_parser("hooks", help="list the hooks an HF model folder offers and how each was found")
    p.add_argument("model", help="local model folder (HF format; only config.json is read)")
    p.set_defaults(handler=lambda args: print(list_hooks(args.model)))


def list_hooks(model_dir: str) -> str:
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dmi import plugins

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir!r} has no config.json; give a local HF model folder")
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    adapter = plugins.adapter_for(model)
    found = adapter.found()
    rows: dict[tuple[str, str, str], list[int]] = {}
    for name, (_, path, how) in found.items():
        m = re.match(r"blocks\.(\d+)\.(.+)", name)
        key = (f"blocks.{{L}}.{m.group(2)}", re.sub(r"\.\d+(\.|$)", r".{L}\1", path, count=1), how) if m else (name, path, how)
        rows.setdefault(key, []).append(int(m.group(1)) if m else -1)
    n = adapter.dims.n_layers
    lines = [f"{cfg.model_type} ({type(model).__name__}), {n} layers; "
             + (f"table {adapter.table.family!r} over the structure" if adapter.table else "all taps from the structure")]
    width = max(len(k[0]) for k in rows)
    for (name, path, how), layers in rows.items():
        where = "" if layers == [-1] else ("" if len(layers) == n else f" [layers {_ranges(layers)}]")
        lines.append(f"  {name.ljust(width)}  {path}: {how}{where}")
    derived = getattr(adapter, "derived", None)
    missing = {s: why for s, why in (derived.missing.items() if derived else ())
               if not any(k[0].endswith(s) for k in rows)}
    if missing:
        lines += ["not offered:"] + [f"  {s}: {why}" for s, why in missing.items()]
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    out, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
