"""Engine faults and lifecycle: no hung threads, the ring released, the file closed; no growth."""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch

import dmi
from helpers import assert_books_balance

PAD, NO_EOS = 257, 319


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dmi_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dmi-")]


def test_request_aborted_mid_stream(load, tmp_path):
    model = load("qwen3")

    class Abort:
        """A streamer that gives up after a few tokens, as a client disconnecting would."""

        def __init__(self):
            self.n = 0

        def put(self, value):
            self.n += 1
            if self.n == 4:
                raise ConnectionAbortedError("client went away")

        def end(self):
            pass

    out = str(tmp_path / "a.h5")
    ids = torch.tensor([[5, 6, 7, 8]])
    with dmi.attach(model, {"hooks": ["blocks.1.hook_resid_post", "hook_logits"], "sink": out}) as s:
        with pytest.raises(ConnectionAbortedError):
            model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                           eos_token_id=NO_EOS, streamer=Abort())
        assert s.frame is None
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=NO_EOS)
    assert _dmi_threads() == []
    run = dmi.open(out)
    assert run.complete and run.requests == ["0", "1"]
    aborted = run.positions("blocks.1.hook_resid_post", "0").tolist()
    assert aborted == list(range(len(aborted))) and 4 <= len(aborted) < 14  # what ran before the abort
    assert run.positions("blocks.1.hook_resid_post", "1").tolist() == list(range(6))
    assert_books_balance(run.stats)
    from reference import reference

    for rid in ("0", "1"):  # greedy: the tokens fed back are the argmax of the logits rows before them
        n = len(run.positions("blocks.1.hook_resid_post", rid))
        seq = [5, 6, 7, 8] + run.get("hook_logits", rid)[: n - 4].argmax(-1).tolist()
        ref = reference(model, seq)
        assert (run.get("blocks.1.hook_resid_post", rid) - ref["blocks.1.hook_resid_post"]).abs().max() < 1e-4


def test_attach_detach_100_times_without_growth(load, tmp_path):
    model = load("qwen3")
    ids = torch.tensor([[1, 2, 3]])
    spec = {"hooks": ["blocks.*.hook_resid_post"], "ring": {"bytes": 1 << 20}, "overwrite": True}  # 3 files reused

    def cycle(i):
        with dmi.attach(model, {**spec, "sink": str(tmp_path / f"{i % 3}.h5")}):
            with torch.no_grad():
                model(ids)

    def hooks():  # transformers installs output-recording hooks of its own on first use
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    for i in range(5):  # warm-up: imports, allocator pools
        cycle(i)
    gc.collect()
    threads, fds, rss, own = threading.active_count(), _fds(), _rss(), hooks()
    for i in range(100):
        cycle(i)
    gc.collect()
    assert threading.active_count() == threads and _dmi_threads() == []
    assert _fds() == fds
    assert _rss() - rss < 32 * 2**20, f"RSS grew by {(_rss() - rss) / 2**20:.1f} MiB over 100 sessions"
    assert hooks() == own


def test_exception_in_generate_releases_everything(load, tmp_path):
    model = load("qwen3")
    out = str(tmp_path / "e.h5")
    s = dmi.attach(model, {"hooks": ["blocks.0.hook_resid_post"], "ring": {"bytes": 1 << 20}, "sink": out})
    with pytest.raises(IndexError):  # a token id past the vocabulary: the embedding raises mid-forward
        model.generate(input_ids=torch.tensor([[1, 10_000]]), max_new_tokens=2, do_sample=False, pad_token_id=PAD,
                       eos_token_id=NO_EOS)
    assert s.frame is None
    s.close()
    assert _dmi_threads() == [] and s.ring.buffer is None
    assert dmi.open(out).complete


@pytest.mark.slow
@pytest.mark.parametrize("overload", ["block", "drop", "degrade"])
def test_soak_small_ring(overload, load, tmp_path):
    """Many requests through a ring that holds a few steps, bounded in time; the books balance and
    memory stays flat."""
    model = load("qwen3")
    spec = {"hooks": ["blocks.*.hook_resid_post", "hook_logits"], "ring": {"bytes": 16 << 10},
            "overload": overload, "sink": str(tmp_path / "soak.h5")}
    if overload == "degrade":
        spec["degrade"] = {"fallback": {"hooks": ["blocks.1.hook_resid_post"], "tokens": "last"}, "high": 0.5,
                           "low": 0.2}
    g = torch.Generator().manual_seed(0)
    rss = []
    deadline = time.monotonic() + 8
    n = 0
    with dmi.attach(model, spec) as s:
        while n < 40 or time.monotonic() < deadline:  # at least 40 requests, however loaded the machine
            ids = torch.randint(1, 250, (4, int(torch.randint(3, 12, (1,), generator=g))), generator=g)
            model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=NO_EOS)
            n += 4
            if n % 40 == 0:
                gc.collect()
                rss.append(_rss())
        s.flush()
        stats = s.stats()
    assert n >= 40
    assert_books_balance(stats)
    assert stats["rows"]["produced"] > 0 and stats["ring"]["high_water_bytes"] <= 16 << 10
    if overload == "block":
        assert stats["rows"]["dropped"] == 0
    if len(rss) >= 3:
        assert rss[-1] - rss[1] < 32 * 2**20, f"memory grew {(rss[-1] - rss[1]) / 2**20:.1f} MiB during the soak"
    run = dmi.open(tmp_path / "soak.h5")
    assert run.complete and len(run.requests) == n
    assert len(run.gaps()) == stats["rows"]["dropped"] - stats["drop_reasons"].get("sink_error", 0)


@pytest.mark.parametrize("interrupt", [False, True], ids=["returns", "ctrl-c"])
def test_a_forked_child_that_leaves_without_close_completes_its_run(interrupt, tiny_dirs, load, tmp_path):
    """multiprocessing children started by fork (vLLM's and SGLang's workers) leave through
    os._exit, where atexit handlers never run: the run is still closed, complete and exact."""
    import multiprocessing

    from helpers import capture_in_child
    from reference import reference

    out = str(tmp_path / "child.h5")
    prompt, new = [5, 6, 7], 3
    # forkserver: a fork of a clean server process (forking this test process, whose torch has
    # run threads, could hang), leaving through os._exit like any forked child
    p = multiprocessing.get_context("forkserver").Process(
        target=capture_in_child, args=(str(tiny_dirs["qwen3"]), out, prompt, new, interrupt))
    p.start()
    p.join(180)
    assert p.exitcode == (1 if interrupt else 0)
    run = dmi.open(out)
    assert run.complete, run.stats.get("errors")
    model = load("qwen3")
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0].tolist()
    seq = gen[:-1]  # the last token is never fed
    assert run.positions("blocks.0.hook_resid_post", "0").tolist() == list(range(len(seq)))
    ref = reference(model, seq)["blocks.0.hook_resid_post"]
    assert (run.get("blocks.0.hook_resid_post", "0") - ref).abs().max() < 1e-4
