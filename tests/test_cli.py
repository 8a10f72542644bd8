"""The command line as a user runs it: run, inspect, demo (real processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import dmi
from reference import reference

DMI = [sys.executable, "-m", "dmi.cli.main"]


def _dmi(*args, cwd=None, env=None):
    return subprocess.run([*DMI, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_run_then_inspect(tiny_dirs, load, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": ids}) for ids in ([5, 6, 7], [8, 9, 10, 11, 12])))
    spec = tmp_path / "s.yaml"
    spec.write_text("hooks: [blocks.*.hook_resid_post, hook_logits]\ntokens: all\n")
    out = tmp_path / "o.h5"
    r = _dmi("run", "--engine", "hf", "--model", str(tiny_dirs["llama"]), "--spec", str(spec),
             "--prompts", str(prompts), "--max-new-tokens", "3", "--out", str(out), "--attn", "eager")
    assert r.returncode == 0, r.stderr
    assert "dmi: step" in r.stderr and "written" in r.stderr  # progress line
    assert "blocks.1.hook_resid_post" in r.stdout and "requests:  2" in r.stdout
    run = dmi.open(out)
    assert run.requests == ["0", "1"]
    got = run.get("blocks.0.hook_resid_post", "0")
    assert got.shape[0] == 3 + 2  # prompt + 2 of the 3 generated tokens were fed back
    # greedy: the tokens fed back are the argmax of the logits rows at positions 2 and 3
    logits = run.get("hook_logits", "0")
    assert run.positions("hook_logits", "0").tolist() == [2, 3, 4]
    seq = [5, 6, 7] + logits[:2].argmax(-1).tolist()
    ref = reference(load("llama"), seq)
    assert (got - ref["blocks.0.hook_resid_post"]).abs().max() < 1e-4
    assert (logits - ref["hook_logits"][2:5]).abs().max() < 1e-4

    r = _dmi("inspect", str(out))
    assert r.returncode == 0, r.stderr
    for word in ("complete", "hook_logits", "mean L2 norm", "dropped rows: 0"):
        assert word in r.stdout


def test_bad_input_exits_2_with_a_message(tiny_dirs, tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text('{"hooks": ["blocks.0.hook_resid_psot"]}')
    prompts = tmp_path / "p.jsonl"  # token ids: the tiny model folder has no tokenizer for text
    prompts.write_text('{"input_ids": [1, 2]}\n')
    r = _dmi("run", "--model", str(tiny_dirs["qwen3"]), "--spec", str(spec), "--prompts", str(prompts),
             "--out", str(tmp_path / "o.h5"))
    assert r.returncode == 2
    assert "blocks.0.hook_resid_post" in r.stderr and "Traceback" not in r.stderr
    r = _dmi("inspect", str(tmp_path / "missing.h5"))
    assert r.returncode == 2 and "missing.h5" in r.stderr


def test_demo_from_nothing(tmp_path):
    r = _dmi("demo", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "demo.h5"), "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "status:    complete" in r.stdout and "blocks.1.attn.hook_pattern" in r.stdout
    run = dmi.open(tmp_path / "demo.h5")
    assert len(run.requests) == 4 and run.stats["rows"]["dropped"] == 0
    assert run.get("hook_logits", "0").dtype == torch.float32
