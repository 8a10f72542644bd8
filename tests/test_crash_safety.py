"""A process killed (SIGKILL) in the middle of capture leaves a file dmi.open reads: marked
incomplete, holding every frame acknowledged before the kill, values intact."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

import dmi
from reference import reference

CHILD = r"""
import sys, torch, dmi
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
spec = dmi.CaptureSpec(hooks=["blocks.*.hook_resid_post", "hook_logits"], ring={"bytes": 1 << 20}, sink=sys.argv[2])
session = dmi.attach(model, spec)
n = 0
while True:
    ids = torch.tensor([[n % 200 + 1, 7, 8, 9, 10], [3, 4, n % 100 + 5, 6, 2]])
    model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=257, eos_token_id=319)
    n += 2
    if n % 4 == 0:
        session.flush()  # acknowledged: everything captured so far is committed
        sys.stdout.write(f"ack {n}\n")  # one write: a kill cannot split the line
        sys.stdout.flush()
"""


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_mid_capture_keeps_every_acknowledged_frame(trial, tiny_dirs, load, tmp_path):
    out = tmp_path / "crash.h5"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_dirs["qwen3"]), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = p.stdout.readline()
        assert first.startswith("ack"), "the child never acknowledged a frame"
        import time

        time.sleep(random.Random(trial).uniform(0.05, 1.5))
    finally:
        os.kill(p.pid, signal.SIGKILL)
        rest = p.stdout.read()
        p.wait()
    # the kill can land mid-line; the last whole "ack N" line is what was acknowledged
    acked = max(int(m) for m in re.findall(r"^ack (\d+)$", first + rest, re.M))
    run = dmi.open(out)
    assert not run.complete
    assert len(run.requests) >= acked
    model = load("qwen3")
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for r in range(acked):
        n = r - r % 2
        prompt = [n % 200 + 1, 7, 8, 9, 10] if r % 2 == 0 else [3, 4, n % 100 + 5, 6, 2]
        pos = run.positions("blocks.0.hook_resid_post", str(r))
        assert pos.tolist() == list(range(10)), f"request {r}: positions {pos.tolist()}"
        logits = run.get("hook_logits", str(r))
        assert run.positions("hook_logits", str(r)).tolist() == list(range(4, 10))
        seq = prompt + logits[:5].argmax(-1).tolist()  # greedy: the fed tokens are the argmax
        ref = reference(model, seq)
        for hook in hooks:
            assert (run.get(hook, str(r)) - ref[hook]).abs().max() < 1e-4


def test_an_idle_engine_leaves_nothing_uncommitted(load, out):
    """A server between requests: rows written before it went idle become readable by another
    process within the commit interval, without a flush and without more traffic."""
    import time

    model = load("qwen3")
    with dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=out)):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        deadline = time.monotonic() + 10
        while True:
            with dmi.open(out) as live:
                have, complete = live.requests, live.complete
            if have == ["0"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert have == ["0"] and not complete


def test_a_live_reader_refreshes_to_see_new_rows(load, out):
    """A reader kept open while the engine serves sees what was committed when it opened (or last
    refreshed); refresh() catches up, and after close shows the run complete."""
    model = load("qwen3")
    hook = "blocks.0.hook_resid_post"
    with dmi.attach(model, dmi.CaptureSpec(hooks=[hook], sink=out)) as s:
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        s.flush()
        live = dmi.open(out)
        assert live.requests == ["0"] and not live.complete
        model.generate(torch.tensor([[4, 5]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        s.flush()
        assert live.requests == ["0"]  # as of open
        assert live.refresh().requests == ["0", "1"]
        assert live.positions(hook, "1").tolist() == [0, 1, 2, 3]
    assert live.refresh().complete
    with dmi.open(out) as fresh:
        assert torch.equal(live.get(hook, "1"), fresh.get(hook, "1"))
    live.close()
