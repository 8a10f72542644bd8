"""Comparisons of an SGLang capture file against the HF reference (tests/reference.py)."""
from __future__ import annotations

import torch
from helpers import assert_books_balance  # noqa: F401  (re-exported for the SGLang tests)
from reference import reference

TOL = 1e-4


def fed(prompt: list[int], output: dict) -> list[int]:
    """Tokens the engine computed for a request: the prompt, then every generated token but the
    last (sampled, never fed back)."""
    return list(prompt) + list(output["output_ids"][:-1])


def assert_request_matches(run, model, rid: str, seq: list[int], hooks, logits_from: int, computed_from: int = 0,
                           tol=TOL):
    """Every hook's rows for `rid` equal the reference at their positions. Full-coverage hooks
    hold exactly positions computed_from..len(seq)-1; logits (one row per request per step)
    hold at least every generated token's position."""
    ref = reference(model, seq)
    for hook in hooks:
        got, pos = run.get(hook, rid), run.positions(hook, rid)
        if hook == "hook_logits":
            # one row per request per step: each decode step, and each prefill chunk's last token
            need = set(range(logits_from, len(seq)))
            assert pos.unique().numel() == pos.numel(), f"{hook} {rid}: duplicated positions {pos.tolist()}"
            assert need <= set(pos.tolist()), f"{hook} {rid}: positions {pos.tolist()} miss {sorted(need)}"
        else:
            expected = torch.arange(computed_from, len(seq))
            assert torch.equal(pos, expected), f"{hook} {rid}: positions {pos.tolist()} != {expected.tolist()}"
        exp = ref[hook][pos]
        assert got.shape == exp.shape, f"{hook} {rid}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
        if not got.dtype.is_floating_point:
            assert torch.equal(got.long(), exp.long()), f"{hook} {rid}: ids differ"
        else:
            err = (got.float() - exp.float()).abs().max().item()
            assert err < tol, f"{hook} {rid}: max abs error {err}"
