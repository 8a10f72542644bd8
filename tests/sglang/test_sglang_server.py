"""`python -m sglang.launch_server` armed through DMI_SPEC: HTTP requests with input_ids, the
file holds every request's rows under the id the server returned (meta_info.id)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from checks import assert_request_matches, fed
from sglang_env import require_sglang

import dmi

pytestmark = pytest.mark.sglang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    """SGLang's own shutdown: SIGTERM to the server, which kills its scheduler."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_served_requests_are_captured_under_the_ids_the_server_returns(sgl_tiny, hf_model, tmp_path):
    require_sglang()
    out = tmp_path / "served.h5"
    port = _free_port()
    env = {**os.environ, "DMI_SPEC": json.dumps({"hooks": ["blocks.*.hook_resid_post", "hook_logits"],
                                                 "sink": str(out)})}
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(sgl_tiny("qwen3")), "--device", "cpu",
           "--skip-tokenizer-init", "--disable-cuda-graph", "--attention-backend", "torch_native",
           "--max-total-tokens", "4096", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error"]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited ({proc.returncode}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not come up in 180 s"
            time.sleep(1)
        prompts = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33]]
        outs = _post(base + "/generate", {"input_ids": prompts,
                                          "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                              "ignore_eos": True}})
        outs.append(_post(base + "/generate", {"input_ids": [41, 42], "sampling_params": {
            "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}}))
        prompts.append([41, 42])
        time.sleep(3)  # the scheduler flushes the file once it is idle
    finally:
        _stop(proc)
        log.close()
    run = dmi.open(str(out))
    # Rows are stored under "<uid>.<prompt>.<choice>" (docs/serving.md), the uid in each answer's
    # `dmi` object: item k of a batch is prompt k. The server's own warmup request is served (and
    # captured) too; its /health probes are not.
    names = [f"{o['dmi']['id']}.{k}.0" for k, o in enumerate(outs[:3])] + [f"{outs[3]['dmi']['id']}.0.0"]
    assert len({o["dmi"]["id"] for o in outs[:3]}) == 1
    assert set(names) <= set(run.requests), run.requests
    assert not [r for r in run.requests if r.startswith("HEALTH_CHECK")]
    model = hf_model("qwen3")
    for p, o, name in zip(prompts, outs, names):
        assert_request_matches(run, model, name, fed(p, o), run.hooks, logits_from=len(p) - 1)
