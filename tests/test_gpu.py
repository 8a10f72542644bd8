"""The GPU path: Triton capture kernel, device ring, event-sealed frames drained over pinned
memory on the drain's own stream, and capture inside torch.compile / CUDA graphs.

Marked `gpu`; skipped without CUDA. Values are compared against the CPU oracle on the same
weights (float32; cuBLAS vs CPU BLAS differ by rounding only, hence the looser tolerance).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dmi
from helpers import assert_books_balance, assert_matches, assert_same_capture, fed_sequences, left_pad

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 9, 23, 7, 81], [12, 3], [44, 45, 46, 47, 48, 49, 50, 51]]
PAD, NO_EOS = 257, 319
GPU_TOL = 2e-3
HOOKS = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_q", "hook_logits"]


@pytest.fixture(scope="module")
def models(load):
    cpu = load("qwen3", attn="sdpa")
    torch.backends.cuda.matmul.allow_tf32 = False
    return cpu, copy.deepcopy(cpu).cuda()


def _generate(model, n=5, **kw):
    ids, mask = left_pad(PROMPTS, PAD)
    return model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, do_sample=False,
                          pad_token_id=PAD, eos_token_id=NO_EOS, **kw)


def _check(run, cpu_model, gen):
    assert_books_balance(run.stats)
    assert run.stats["rows"]["dropped"] == 0
    for rid, seq in enumerate(fed_sequences(gen.cpu(), PROMPTS)):
        assert_matches(run, cpu_model, str(rid), seq, run.hooks, logits_from=len(PROMPTS[rid]) - 1, tol=GPU_TOL)


def test_eager_capture_on_gpu_matches_reference(models, out):
    cpu, gpu = models
    with dmi.attach(gpu, dmi.CaptureSpec(hooks=HOOKS, sink=out)) as s:
        assert s.ring.buffer.device.type == "cuda"
        gen = _generate(gpu)
    _check(dmi.open(out), cpu, gen)


def test_ring_memory_is_fixed_after_attach(models, out):
    _, gpu = models
    spec = dmi.CaptureSpec(hooks=HOOKS, sink=out, ring={"bytes": 8 * 2**20})
    with dmi.attach(gpu, spec) as s:
        ptr, n = s.ring.buffer.data_ptr(), s.ring.buffer.numel()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            _generate(gpu)
        s.flush()
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        assert (s.ring.buffer.data_ptr(), s.ring.buffer.numel()) == (ptr, n)
    # generate's KV cache and activations are freed when it returns; what stays is dmi's upload
    # staging and nothing that grows with steps.
    assert after - before < 2 * 2**20, (before, after)


def _sync_warnings(fn) -> int:
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_capture_adds_no_synchronization_per_step(models, out):
    """generate synchronizes on its own; attached, the only extra synchronization allowed is the
    one read of the prompt's mask per generate, never one per decode step."""
    _, gpu = models
    _generate(gpu)  # warm
    bare = {n: _sync_warnings(lambda n=n: _generate(gpu, n=n)) for n in (4, 12)}
    with dmi.attach(gpu, dmi.CaptureSpec(hooks=HOOKS, sink=out)):
        _generate(gpu)  # warm the capture path (first-use allocations)
        attached = {n: _sync_warnings(lambda n=n: _generate(gpu, n=n)) for n in (4, 12)}
    extra = {n: attached[n] - bare[n] for n in attached}
    assert extra[12] == extra[4] <= 2, f"dmi's synchronizations grow with the steps: {extra} (bare {bare})"


def test_static_cache_compiled_cuda_graphs_match_eager(models, out, tmp_path):
    """generate(cache_implementation="static") compiles the decode step with
    mode="reduce-overhead" (CUDA graphs) on a GPU; captured rows must equal eager's."""
    cpu, gpu = models
    eager_out = str(tmp_path / "eager.h5")
    with dmi.attach(gpu, dmi.CaptureSpec(hooks=HOOKS, sink=eager_out)):
        gen_e = _generate(gpu, n=6)
    with dmi.attach(gpu, dmi.CaptureSpec(hooks=HOOKS, sink=out)):
        gen_g = _generate(gpu, n=6, cache_implementation="static")
        gen_g2 = _generate(gpu, n=6, cache_implementation="static")  # replays the recorded graphs
    assert torch.equal(gen_e, gen_g) and torch.equal(gen_g, gen_g2)
    e, g = dmi.open(eager_out), dmi.open(out)
    _check(g, cpu, gen_g)
    assert_same_capture(g, e, tol=GPU_TOL)


def test_dropped_frames_write_nothing_on_gpu(models, out):
    _, gpu = models
    spec = dmi.CaptureSpec(hooks=HOOKS, sink=out, overload="drop", ring={"bytes": 64 * 1024})
    with dmi.attach(gpu, spec):
        gen = _generate(gpu, n=8)
    run = dmi.open(out)
    assert_books_balance(run.stats)
    assert run.stats["rows"]["dropped"] > 0, "a 64 KiB ring should not hold this run"
    for rid, seq in enumerate(fed_sequences(gen.cpu(), PROMPTS)):
        hook = "blocks.0.hook_resid_post"
        kept = set(run.positions(hook, str(rid)).tolist())
        lost = {g["position"] for g in run.gaps(hook, str(rid))}
        assert not kept & lost and kept | lost == set(range(len(seq)))  # every row written or recorded
    # the rows that were written are exact (a dropped frame wrote nothing over them)
    cpu = models[0]
    for rid, seq in enumerate(fed_sequences(gen.cpu(), PROMPTS)):
        ref = __import__("reference").reference(cpu, seq)["blocks.0.hook_resid_post"]
        pos = run.positions("blocks.0.hook_resid_post", str(rid))
        if len(pos):
            got = run.get("blocks.0.hook_resid_post", str(rid))
            assert (got - ref[pos]).abs().max().item() < GPU_TOL
