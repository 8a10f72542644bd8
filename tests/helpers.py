from __future__ import annotations

import torch

from reference import reference

TOL = 1e-4


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def fed_sequences(out: torch.Tensor, prompts: list[list[int]], eos=frozenset()) -> list[list[int]]:
    """Tokens the model computed for each request in generate: the prompt, then generated tokens
    fed back, stopping before the last one (never fed) or at the first EOS (the request ended)."""
    width = max(map(len, prompts))
    seqs = []
    for b, p in enumerate(prompts):
        fed = []
        for tok in out[b, width:].tolist()[:-1]:
            if tok in eos:
                break
            fed.append(tok)
        seqs.append(p + fed)
    return seqs


def assert_matches(run, model, rid: str, seq: list[int], hooks: list[str], logits_from: int | None = None,
                   tol: float = TOL) -> None:
    ref = reference(model, seq)
    for hook in hooks:
        got = run.get(hook, rid)
        pos = run.positions(hook, rid)
        if hook == "hook_logits" and logits_from is not None:
            expected_pos = torch.arange(logits_from, len(seq))
        else:
            expected_pos = torch.arange(len(seq))
        assert torch.equal(pos, expected_pos), f"{hook} request {rid}: positions {pos.tolist()} != {expected_pos.tolist()}"
        exp = ref[hook][pos]
        if hook.endswith("hook_pattern"):
            exp = exp[..., : int(pos.max()) + 1]
        assert got.shape == exp.shape, f"{hook} request {rid}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
        if got.dtype in (torch.int64, torch.int32):
            assert torch.equal(got, exp.to(got.dtype)), f"{hook} request {rid}: ids differ"
        else:
            err = (got.float() - exp.float()).abs().max().item()
            assert err < tol, f"{hook} request {rid}: max abs error {err}"


def assert_books_balance(stats: dict) -> None:
    for hook, c in stats["hooks"].items():
        assert c["in_flight"] == 0, (hook, c)
        assert c["produced"] == c["filtered"] + c["written"] + c["dropped"], (hook, c)
