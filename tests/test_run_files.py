"""Run files are never replaced unasked, and a small run makes a small file."""
from __future__ import annotations

import os

import pytest
import torch

import dmi
from dmi.errors import SinkPathError


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_existing_run_refused_at_attach_unless_overwrite(load, tmp_path):
    model = load("qwen3")
    out = tmp_path / "run.h5"
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(out))):
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
    before = out.read_bytes()
    hooks = _hook_count(model)
    with pytest.raises(SinkPathError, match=f"{out}.*already exists.*overwrite: true"):
        dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(out)))
    with pytest.raises(SinkPathError, match="already exists"):
        dmi.attach(model, {"hooks": ["blocks.0.hook_resid_post"], "sink": {"kind": "hdf5", "path": str(out)}})
    assert out.read_bytes() == before and _hook_count(model) == hooks   # engine and file untouched
    assert dmi.open(out).requests == ["0"]
    spec = dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=str(out), overwrite=True)
    assert spec.sink == {"kind": "hdf5", "path": str(out), "overwrite": True}
    assert dmi.CaptureSpec.parse(spec.to_json()) == spec             # round-trips as stored in files
    with dmi.attach(model, spec):
        with torch.no_grad():
            model(input_ids=torch.tensor([[4, 5], [6, 7]]))
    run = dmi.open(out)
    assert run.requests == ["0", "1"] and run.get("blocks.0.hook_resid_post", "1").shape[0] == 2


def test_small_run_file_stays_near_its_row_bytes(load, tmp_path):
    """File <= 1.5 x row bytes + 64 KiB + 16 KiB per hook (HDF5 object headers and chunk
    indexes). Before chunks were sized from the first append, 0.22 MB of rows made 9 MB."""
    model = load("qwen3")
    out = tmp_path / "small.h5"
    ids = torch.arange(10, 28).reshape(3, 6)
    with dmi.attach(model, dmi.CaptureSpec(hooks=["all"], sink=str(out))):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    run = dmi.open(out)
    rows = sum(run.data_bytes(h) for h in run.hooks)
    size = os.path.getsize(out)
    assert len(run.hooks) > 20 and rows > 100_000
    assert size <= 1.5 * rows + (64 << 10) + (16 << 10) * len(run.hooks), (size, rows, len(run.hooks))
