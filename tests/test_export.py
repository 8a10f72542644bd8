"""`dmi export`: HDF5 -> Parquet / safetensors dataset -> HDF5 keeps every row, gap and count."""
from __future__ import annotations

import pytest
import torch

import dmi
from dmi.cli import main
from helpers import assert_same_capture, left_pad

pytest.importorskip("pyarrow")

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]


@pytest.fixture(scope="module")
def source(load, tmp_path_factory):
    """A bf16 capture with a ragged hook and some dropped rows (gaps)."""
    model = load("qwen3", dtype=torch.bfloat16)
    out = str(tmp_path_factory.mktemp("export") / "src.h5")
    ids, mask = left_pad(PROMPTS, 257)
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"],
                                           sink=out)) as s:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=257,
                       eos_token_id=319)
        s.not_computed("1", [0, 1], reason="prefix_cache")   # gaps to carry over
    return out


@pytest.mark.parametrize("fmt", ["parquet", "safetensors"])
def test_export_round_trip(source, tmp_path, fmt, capsys):
    ds = str(tmp_path / "ds")
    assert main(["export", source, "--to", fmt, ds, "--shard-mb", "0.0005"]) == 0
    captured = capsys.readouterr()
    assert "dmi export" in captured.out and "hook x request" in captured.err   # the progress bar
    src = dmi.open(source)
    assert src.dtype("blocks.0.hook_resid_post") == "bfloat16"
    assert main(["inspect", ds]) == 0 and "hook_resid_post" in capsys.readouterr().out   # summarised like a file
    mid = dmi.open(ds)
    assert mid.shard_paths()[0].endswith("." + fmt) and len(mid.shard_paths("blocks.0.hook_resid_post")) >= 2
    assert_same_capture(mid, src)
    back = str(tmp_path / "back.h5")
    assert main(["export", ds, "--to", "hdf5", back, "--quiet"]) == 0
    out = dmi.open(back)
    assert_same_capture(out, src)
    for hook in src.hooks:
        for r in src.requests:
            assert torch.equal(out.steps(hook, r), src.steps(hook, r))
    key = lambda g: (g["hook"], g["request"], g["position"], g["reason"])  # noqa: E731
    assert sorted(map(key, out.gaps())) == sorted(map(key, src.gaps())) and src.gaps()
    assert out.stats["rows"] == src.stats["rows"] and out.complete


def test_export_refuses_existing_destination_and_bad_input(source, tmp_path, capsys):
    dest = tmp_path / "x.h5"
    dest.write_bytes(b"keep me")
    assert main(["export", source, "--to", "hdf5", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and str(dest) in err[0]
    assert dest.read_bytes() == b"keep me"
    assert main(["export", source, "--to", "hdf5", str(dest), "--overwrite", "--quiet"]) == 0
    assert dmi.open(dest).requests == dmi.open(source).requests
    assert main(["export", str(tmp_path / "missing.h5"), "--to", "parquet", str(tmp_path / "d")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["export", source, "--to", "csv", str(tmp_path / "d")])
    assert e.value.code == 2


def test_activation_dataset_reads_safetensors_shards(source, tmp_path):
    from torch.utils.data import DataLoader

    from dmi.reader.torch_data import ActivationDataset

    ds = str(tmp_path / "st")
    assert main(["export", source, "--to", "safetensors", ds, "--shard-mb", "0.0005", "--quiet"]) == 0
    src = dmi.open(source)
    hook = "blocks.1.hook_resid_post"
    data = ActivationDataset(ds, hook, batch_size=4, shuffle_buffer=0, dtype=None, with_index=True)
    assert len(data) == src.num_rows(hook)
    got = {(r, int(p)): row for x, reqs, pos in DataLoader(data, batch_size=None) for row, r, p in zip(x, reqs, pos)}
    assert len(got) == src.num_rows(hook)
    for r in src.requests:
        for p, row in zip(src.positions(hook, r).tolist(), src.get(hook, r)):
            assert torch.equal(got[(r, p)], row)   # bfloat16 kept bit for bit with dtype=None
    with pytest.raises(ValueError, match="ragged"):
        ActivationDataset(ds, "blocks.0.attn.hook_pattern")
