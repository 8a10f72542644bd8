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
        if hook in ("hook_logits", "unembed.hook_out", "unembed.hook_in") and logits_from is not None:
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


def assert_same_capture(got, want, tol: float | None = None) -> None:
    """Two capture files hold the same requests, hooks and positions, and values equal (bit for
    bit when tol is None, else max abs error below tol)."""
    assert got.requests == want.requests and got.hooks == want.hooks
    for hook in want.hooks:
        for r in want.requests:
            assert torch.equal(got.positions(hook, r), want.positions(hook, r)), (hook, r)
            if tol is None:
                assert torch.equal(got.get(hook, r), want.get(hook, r)), (hook, r)
            else:
                assert (got.get(hook, r) - want.get(hook, r)).abs().max() < tol, (hook, r)


def assert_books_balance(stats: dict) -> None:
    for hook, c in stats["hooks"].items():
        assert c["in_flight"] == 0, (hook, c)
        assert c["produced"] == c["filtered"] + c["written"] + c["dropped"], (hook, c)


def check_engine_bench(engine: str, tmp_path, own_modes: tuple[str, ...] = ()) -> None:
    """matrix_bench runs `engine`'s cells for real: off, dmi, dmi-null (and the engine's own
    modes) measured, an HF-only mode reported as not applicable."""
    from matrix_bench.cli import main
    from matrix_bench.results import read

    modes = ("off", "dmi", "dmi-null", *own_modes)
    out = tmp_path / "bench.h5"
    assert main(["--engines", engine, "--model", "tiny", "--batch-sizes", "2", "--decode-lens", "3",
                 "--prompt-len", "6", "--repeats", "1", "--modes", ",".join((*modes, "hf-attentions")),
                 "--out", str(out)]) == 0
    rows = read(str(out))
    ok = {r["mode"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == set(modes)
    assert ok["dmi"]["bytes_captured"] > 0 and ok["dmi-null"]["bytes_captured"] == 0
    assert all(r["tokens_per_s"] > 0 for r in ok.values())
    assert [r["status"] for r in rows if r["mode"] == "hf-attentions"] == [f"not applicable to {engine}"]


def capture_in_child(model_dir: str, out: str, prompt: list[int], new: int, interrupt: bool) -> None:
    """A multiprocessing child (an engine worker's shape): capture one generate and leave
    without closing the session, normally or by a Ctrl-C's KeyboardInterrupt."""
    from transformers import AutoModelForCausalLM

    import dmi

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=out))
    model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    if interrupt:
        raise KeyboardInterrupt
