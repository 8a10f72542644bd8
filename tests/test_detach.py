from __future__ import annotations

import torch

import dmi


def _fingerprint(model):
    return {
        "dict": sorted(model.__dict__),
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_always_called))
                  for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "generate": type(model).generate,
    }


def test_detach_leaves_model_exactly_as_it_was(load, tmp_path):
    model = load("qwen2")
    ids = torch.tensor([[1, 2, 3, 4]])
    before = _fingerprint(model)
    expected = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=257)
    for i in range(3):
        with dmi.attach(model, {"hooks": ["all"], "sink": str(tmp_path / f"{i}.h5")}):
            assert "generate" in model.__dict__
            got = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=257)
            assert torch.equal(got, expected)  # capture never changes what the model computes
        after = _fingerprint(model)
        assert after["dict"] == before["dict"]
        assert after["hooks"] == before["hooks"]
        assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
        assert model.generate.__func__ is type(model).generate
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=257), expected)


def test_exception_inside_forward_keeps_session_usable(load, tmp_path):
    model = load("qwen3")
    out = str(tmp_path / "x.h5")

    def boom(m, a, o):
        raise RuntimeError("engine fault")

    with dmi.attach(model, {"hooks": ["blocks.*.hook_resid_post"], "sink": out}) as s:
        h = model.model.layers[1].mlp.register_forward_hook(boom)  # inside layer 1, before its output
        try:
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3]]))
            raise AssertionError("the fault did not fire")
        except RuntimeError as e:
            assert "engine fault" in str(e)
        finally:
            h.remove()
        assert s.frame is None  # the step was closed although the forward raised
        with torch.no_grad():
            model(torch.tensor([[4, 5]]))
    run = dmi.open(out)
    assert run.requests == ["0", "1"]
    assert len(run.get("blocks.1.hook_resid_post", "0")) == 0
    from reference import reference

    # captured before the fault: kept, and exact; the engine serves correctly afterwards
    before = reference(model, [1, 2, 3])["blocks.0.hook_resid_post"]
    assert (run.get("blocks.0.hook_resid_post", "0") - before).abs().max() < 1e-4
    after = reference(model, [4, 5])
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        assert (run.get(hook, "1") - after[hook]).abs().max() < 1e-4


def test_a_session_never_closed_is_written_out_at_exit(tiny_dirs, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "x.h5"
    script = (
        "import torch, dmi\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_dirs['qwen3'])!r}).eval()\n"
        f"s = dmi.attach(m, {{'hooks': ['blocks.0.hook_resid_post'], 'sink': {str(out)!r}}})\n"
        "with torch.no_grad():\n"
        "    m(torch.tensor([[1, 2, 3]]))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    run = dmi.open(out)
    assert run.complete and run.get("blocks.0.hook_resid_post", "0").shape == (3, 64)
