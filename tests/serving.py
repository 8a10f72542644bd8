"""Harness for served-engine tests: start a server on 127.0.0.1, wait for it, stop it, and
check a tenant's rows (fetched through /v1/dmi) against the HF oracle."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import torch
from reference import reference

TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], env: dict, log_path, port: int, up_s: float = 240):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115  (written by the server until it stops)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + up_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up in {up_s} s:\n{self.tail()}")
            time.sleep(1)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return open(self.log_path).read()[-n:]

    def stop(self, sig=signal.SIGINT, wait: float = 60) -> None:
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(wait)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def expected_positions(n_fed: int, prompt_len: int, hook: str, tokens: str = "all") -> list[int]:
    """Positions a request's rows of `hook` hold for a token mode, when every step of it ran
    unchunked (one prefill, then one decode step per token)."""
    if hook == "hook_logits":
        pos = list(range(prompt_len - 1, n_fed))
        first_decode = prompt_len
    else:
        pos = list(range(n_fed))
        first_decode = prompt_len
    if tokens == "decode":
        pos = [p for p in pos if p >= first_decode]
    elif tokens == "prefill":
        pos = [p for p in pos if p < first_decode]
    return pos


def assert_rows_match(rows: dict, model, seq: list[int], want: dict[str, list[int]], tol: float = TOL) -> None:
    """`rows` (dmi.client.Client.rows) hold exactly the hooks of `want`, at its positions, equal
    to the HF oracle over `seq` (the tokens the engine computed)."""
    ref = reference(model, seq)
    got_hooks = sorted(k for k in rows if not k.endswith(".positions") and k != "__dmi__")
    assert got_hooks == sorted(want), f"hooks {got_hooks} != {sorted(want)}"
    for hook, positions in want.items():
        pos = rows[hook + ".positions"]
        assert pos.tolist() == positions, f"{hook}: positions {pos.tolist()} != {positions}"
        exp = ref[hook][pos]
        got = rows[hook]
        assert got.shape == exp.shape, f"{hook}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
        err = (got.float() - exp.float()).abs().max().item() if len(pos) else 0.0
        assert err < tol, f"{hook}: max abs error {err}"
