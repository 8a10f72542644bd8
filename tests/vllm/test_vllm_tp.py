"""Tensor parallel (TP=2, two CPU workers over gloo): each rank captures its slice of the split
hooks (q/k/v/z heads, MLP features) into its own file, rank 0 also the whole rows, and dmi.open
merges the rank files into rows equal to HF's on the same weights.

The model has one kv head for two ranks, so vLLM replicates it: both ranks hold the same kv
slice. Layer 0 is a dense MLP (split features), layer 1 a MoE block (whole output).
Eager, and compiled with the spec armed at construction (each rank arms after its load).
"""
from __future__ import annotations

import os

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance
from vllm_util import PROMPTS, check_outputs, env, generate, make_llm, shutdown

import dmi
from dmi.tiny import build_tiny_model

pytestmark = pytest.mark.vllm

HOOKS = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_q", "blocks.*.attn.hook_k", "blocks.*.attn.hook_v",
         "blocks.*.attn.hook_z", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post", "blocks.*.hook_mlp_out", "blocks.1.mlp.hook_router_logits",
         "blocks.1.mlp.hook_topk_ids", "hook_logits"]


def _omp_bind() -> str:
    # vLLM's CPU workers bind one OpenMP team per rank to a NUMA node by default; these machines
    # have one node, so give each rank its own core (or no binding on a one-core machine).
    cpus = sorted(os.sched_getaffinity(0))
    return f"{cpus[0]}|{cpus[1]}" if len(cpus) >= 2 else "nobind"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tp") / "qwen3_moe_kv1", num_key_value_heads=1)


@pytest.fixture
def llm(model_dir):
    # Function scope: the compiled test below starts its own TP engine; two would share the cores.
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=1, VLLM_CPU_OMP_THREADS_BIND=_omp_bind()):
        engine = make_llm(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp")
    yield engine
    shutdown(engine)


def test_tp2_ranks_merge_to_the_reference(llm, model_dir, out):
    import torch
    from transformers import AutoModelForCausalLM

    with dmi.attach(llm, dmi.CaptureSpec(hooks=HOOKS, sink=out)) as s:
        outs = generate(llm)
        stats = s.stats()
    assert [r["hooks"] != {} for r in stats["ranks"]] == [True, True]
    assert os.path.exists(out + ".rank1")

    with dmi.open(out, merge_ranks=False) as first, dmi.open(out + ".rank1", merge_ranks=False) as second:
        # Rank 1 holds only the split hooks: its halves of the 4 q heads and 128 MLP features,
        # and the single kv head (replicated).
        assert set(second.hooks) == {h for h in first.hooks if first.shard(h) is not None}
        assert second.shard("blocks.0.attn.hook_q") == (0, 2, 4, 4)
        assert second.shard("blocks.0.attn.hook_k") == (0, 0, 1, 1)
        assert second.shard("blocks.0.mlp.hook_post") == (0, 64, 128, 128)
        assert second.shard("blocks.0.mlp.hook_pre") == (0, 64, 128, 128)
        assert first.shape("blocks.0.attn.hook_z") == (2, 32)
        assert first.shard("blocks.1.hook_mlp_out") is None
    run = dmi.open(out)
    assert run.complete and run.tp_size == 2
    assert run.shape("blocks.0.attn.hook_q") == (4, 32) and run.shape("blocks.0.mlp.hook_post") == (128,)
    for rank_stats in run.stats["tp_ranks"]:
        assert_books_balance(rank_stats)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    check_outputs(run, hf, outs)
    run.close()


def test_tp2_compiled_armed_at_construction(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    sink = str(tmp_path / "armed.h5")
    hooks = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_q", "blocks.0.mlp.hook_post",
             "blocks.1.mlp.hook_topk_weights", "blocks.1.mlp.hook_topk_ids", "hook_logits"]
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=1, VLLM_CPU_OMP_THREADS_BIND=_omp_bind(),
             VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache")):
        engine = make_llm(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp", enforce_eager=False,
                          additional_config={"dmi": {"hooks": hooks, "sink": sink}})
    try:
        with dmi.attach(engine) as s:
            assert s.armed
            outs = generate(engine, PROMPTS[:3], [4, 2, 3])
    finally:
        shutdown(engine)
    with dmi.open(sink) as run:
        assert run.complete and run.tp_size == 2 and run.shape("blocks.1.attn.hook_q") == (4, 32)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
        check_outputs(run, hf, outs)


def test_rank_files_need_a_path_sink():
    from dmi.adapters.vllm.binding import rank_sink
    from dmi.errors import SpecError

    assert rank_sink("run.h5", 1, 2) == "run.h5.rank1"
    assert rank_sink({"kind": "hdf5", "path": "run.h5"}, 1, 2) == {"kind": "hdf5", "path": "run.h5.rank1"}
    with pytest.raises(SpecError, match="tensor-parallel ranks"):
        rank_sink({"kind": "socket", "address": "x"}, 1, 2)


def test_tp2_served_results_wait_for_every_rank(tiny_dirs, tmp_path, load):
    """A served TP=2 engine: a client's rows, read right after its response, hold both ranks'
    halves of the split hooks and equal the oracle. Each rank commits on its own clock; the
    results read waits until every rank has acknowledged the flush, not rank 0 alone."""
    import json
    import sys

    from serving import Server, assert_rows_match, free_port

    from dmi.client import Client

    hooks = ["blocks.1.hook_resid_post", "blocks.*.attn.hook_q", "blocks.0.mlp.hook_post"]
    sink, port = str(tmp_path / "tp.h5"), free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dirs["qwen3"]),
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256",
           "--max-num-seqs", "2", "--kv-cache-memory-bytes", str(64 * 2**20), "--skip-tokenizer-init",
           "--enforce-eager", "--shutdown-timeout", "20", "--tensor-parallel-size", "2",
           "--distributed-executor-backend", "mp",
           # commits only when asked: a read that waited for rank 0 alone would miss rank 1's rows
           "--additional-config", json.dumps({"dmi": {"hooks": hooks, "sink": {"kind": "hdf5", "path": sink, "flush_every_s": 3600}}})]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "VLLM_CPU_OMP_THREADS_BIND": _omp_bind()}
    server = Server(cmd, env, tmp_path / "server.log", port)
    hf = load("qwen3")
    try:
        c = Client(server.base)
        for k, prompt in enumerate([[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]):
            r = c.completions(model=str(tiny_dirs["qwen3"]), prompt=prompt, max_tokens=3 + k, temperature=0,
                              ignore_eos=True, return_token_ids=True, dmi={"hooks": hooks})
            choice = r["choices"][0]
            seq = list(choice["prompt_token_ids"]) + list(choice["token_ids"])[:-1]
            want = {h: list(range(len(seq))) for h in
                    ["blocks.1.hook_resid_post", "blocks.0.attn.hook_q", "blocks.1.attn.hook_q", "blocks.0.mlp.hook_post"]}
            assert_rows_match(c.rows(r), hf, seq, want)
    finally:
        server.stop()
    assert os.path.exists(sink + ".rank1")
