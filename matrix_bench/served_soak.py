"""A served soak on loopback: one vLLM server, mixed tenants, streams and cancelled streams,
bounded in request count and time; armed against unarmed.

    python -m matrix_bench.served_soak --requests 2000 --concurrency 8 --time-limit 900 --out soak/

For each mode (unarmed: a plain server; armed: `--additional-config {"dmi": ..., "dmi_serve":
...}` with two tenants asking for different hooks and tokens) it sends the same request mix
and reports, per mode, TTFT and TPOT p50/p99 measured at the server (vLLM's own histograms on
/metrics, quantiles interpolated within buckets) and at the client (streamed requests, exact).
Armed, it then checks that no committed row is lost: every finished request's manifest is
complete (every position its spec keeps, once, no gap), every cancelled one holds a prefix
of positions without duplicates, and the closed file's books balance.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TENANTS = {"key-a": "alice", "key-b": "bob"}
SPECS = {"key-a": {"hooks": ["blocks.0.hook_resid_post"]},
         "key-b": {"hooks": ["blocks.1.hook_resid_post", "hook_logits"], "tokens": "decode"}}
HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, armed: bool, workdir: Path, max_num_seqs: int):
    port = _port()
    sink = str(workdir / "soak.h5")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs",
           str(max_num_seqs), "--kv-cache-memory-bytes", str(128 * 2**20), "--skip-tokenizer-init",
           "--enforce-eager", "--shutdown-timeout", "30"]
    if armed:
        cmd += ["--additional-config", json.dumps({"dmi": {"hooks": HOOKS, "sink": sink},
                                                   "dmi_serve": {"tenants": TENANTS, "capture_unasked": False}})]
    log = open(workdir / f"server-{'armed' if armed else 'unarmed'}.log", "w")  # noqa: SIM115
    env = {**os.environ, "VLLM_CACHE_ROOT": str(workdir / "vllm-cache")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {open(log.name).read()[-3000:]}")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                raise RuntimeError("server did not come up") from None
            time.sleep(1)
    return proc, log, base, sink


def stop(proc, log) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def histogram(base: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(upper bounds, cumulative counts) of a Prometheus histogram on /metrics."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    les, counts = [], []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            les.append(float("inf") if le == "+Inf" else float(le))
            counts.append(float(line.rsplit(" ", 1)[1]))
    order = np.argsort(les)
    return np.asarray(les)[order], np.asarray(counts)[order]


def quantile(bounds: np.ndarray, cum: np.ndarray, q: float) -> float:
    """Quantile q of a bucketed histogram, linear within the bucket (as Prometheus does)."""
    total = cum[-1]
    if total <= 0:
        return float("nan")
    rank = q * total
    i = int(np.searchsorted(cum, rank))
    hi = bounds[min(i, len(bounds) - 2)] if np.isinf(bounds[i]) else bounds[i]
    lo = bounds[i - 1] if i > 0 else 0.0
    below = cum[i - 1] if i > 0 else 0.0
    inside = cum[i] - below
    return float(lo + (hi - lo) * ((rank - below) / inside if inside > 0 else 1.0))


def one(base: str, model: str, i: int, rng: random.Random, armed: bool) -> dict:
    key = "key-a" if i % 2 == 0 else "key-b"
    plen = rng.randint(3, 40)
    prompt = [rng.randint(1, 250) for _ in range(plen)]
    max_tokens = rng.randint(4, 16)
    stream = rng.random() < 0.5
    cancel = stream and rng.random() < 0.2
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, "return_token_ids": True}
    if armed:
        body["dmi"] = SPECS[key]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), headers)
    t0 = time.perf_counter()
    out = {"i": i, "key": key, "prompt": prompt, "stream": stream, "cancelled": cancel, "max_tokens": max_tokens}
    with urllib.request.urlopen(req, timeout=300) as r:
        out["uid"] = r.headers.get("x-dmi-id")
        out["token"] = r.headers.get("x-dmi-token")
        if not stream:
            doc = json.loads(r.read())
            out["tokens"] = doc["choices"][0]["token_ids"]
            out["latency"] = time.perf_counter() - t0
            return out
        times, tokens = [], []
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            doc = json.loads(line[6:])
            ids = doc["choices"][0].get("token_ids") or []
            if ids:
                times.append(time.perf_counter())
                tokens += ids
            if cancel and len(tokens) >= 2:
                break  # closing the connection aborts the request in the engine
    out["tokens"] = tokens
    if times:
        out["ttft"] = times[0] - t0
        if len(times) > 1:
            out["tpot"] = (times[-1] - times[0]) / (len(times) - 1)
    return out


def load(base: str, model: str, n: int, concurrency: int, time_limit: float, armed: bool, seed: int = 0):
    stop_at = time.time() + time_limit
    rngs = [random.Random(seed * 100003 + i) for i in range(n)]
    done, lock = [], threading.Lock()

    def task(i):
        if time.time() > stop_at:
            return
        r = one(base, model, i, rngs[i], armed)
        with lock:
            done.append(r)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(task, range(n)))
    return sorted(done, key=lambda r: r["i"])


def expected(r: dict, spec: dict) -> dict[str, list[int]] | None:
    """Positions a finished request's rows hold per hook (None: cancelled, not known)."""
    if r["cancelled"]:
        return None
    p, fed = len(r["prompt"]), len(r["prompt"]) + len(r["tokens"]) - 1
    out = {}
    for h in spec["hooks"]:
        pos = list(range(p - 1, fed)) if h == "hook_logits" else list(range(fed))
        if spec.get("tokens") == "decode":
            pos = [x for x in pos if x >= p]
        out[h] = pos
    return out


def verify(base: str, results: list[dict]) -> dict:
    """No committed row lost: each request's manifest against what its spec keeps."""
    from dmi.client import Client

    bad, checked = [], 0
    client = Client(base)
    for r in results:
        man = client.manifest(r["uid"], token=r["token"])["requests"][0]
        (part,) = man["parts"] or [None]
        if part is None:
            if not r["cancelled"]:
                bad.append((r["i"], "no rows"))
            continue
        want = expected(r, SPECS[r["key"]])
        for hook, h in part["hooks"].items():
            held = [p for a, b in h["positions"] for p in range(a, b)]
            if h["dropped"]:
                bad.append((r["i"], hook, h["dropped"]))
            elif want is not None and held != want[hook]:
                bad.append((r["i"], hook, "positions", held[:5], want[hook][:5]))
            elif want is None and held != sorted(set(held)):
                bad.append((r["i"], hook, "duplicated positions"))
        checked += 1
    return {"checked": checked, "bad": bad[:20], "n_bad": len(bad)}


def summarize(results: list[dict], server: dict) -> dict:
    def pct(xs, q):
        return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")

    ttft = [r["ttft"] for r in results if "ttft" in r]
    tpot = [r["tpot"] for r in results if "tpot" in r]
    return {"requests": len(results), "streams": sum(r["stream"] for r in results),
            "cancelled": sum(r["cancelled"] for r in results),
            "client_ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "client_tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)}, **server}


def server_side(base: str) -> dict:
    out = {}
    for key, name in (("server_ttft_ms", "vllm:time_to_first_token_seconds"),
                      ("server_tpot_ms", "vllm:inter_token_latency_seconds")):
        b, c = histogram(base, name)
        out[key] = {"p50": quantile(b, c, 0.5) * 1e3, "p99": quantile(b, c, 0.99) * 1e3} if len(b) else {}
    return out


def run(model: str, n: int, concurrency: int, time_limit: float, workdir: Path, modes=("unarmed", "armed")) -> dict:
    report = {}
    for mode in modes:
        armed = mode == "armed"
        wd = workdir / mode
        wd.mkdir(parents=True, exist_ok=True)
        proc, log, base, sink = start(model, armed, wd, max_num_seqs=concurrency)
        try:
            t0 = time.time()
            results = load(base, model, n, concurrency, time_limit, armed)
            report[mode] = summarize(results, server_side(base))
            report[mode]["wall_s"] = time.time() - t0
            if armed:
                report[mode]["lossless"] = verify(base, results)
        finally:
            stop(proc, log)
        if armed:
            import dmi

            run_ = dmi.open(sink)
            books = all(c["produced"] == c["filtered"] + c["written"] + c["dropped"] and c["in_flight"] == 0
                        for c in run_.stats["hooks"].values())
            report[mode]["file"] = {"complete": bool(run_.complete), "books_balance": books,
                                    "requests": len(run_.requests), "errors": run_.stats.get("errors", [])[:3]}
    return report


def run_interleaved(model: str, n: int, concurrency: int, time_limit: float, workdir: Path,
                    block: int = 100) -> dict:
    """Both servers up at once; blocks of `block` requests go to one, then the other, so slow
    changes in the machine's load (a shared machine) hit both modes alike."""
    servers = {}
    for mode in ("unarmed", "armed"):
        wd = workdir / mode
        wd.mkdir(parents=True, exist_ok=True)
        servers[mode] = start(model, mode == "armed", wd, max_num_seqs=concurrency)
    results = {m: [] for m in servers}
    walls = dict.fromkeys(servers, 0.0)
    report = {}
    try:
        stop_at = time.time() + time_limit
        for first in range(0, n, block):
            for mode, (_, _, base, _) in servers.items():
                if time.time() > stop_at:
                    break
                t0 = time.time()
                got = load(base, model, min(block, n - first), concurrency, max(1.0, stop_at - time.time()),
                           mode == "armed", seed=first)
                walls[mode] += time.time() - t0
                results[mode] += [{**r, "i": r["i"] + first} for r in got]
        for mode, (_, _, base, _) in servers.items():
            report[mode] = summarize(results[mode], server_side(base))
            report[mode]["wall_s"] = walls[mode]
        report["armed"]["lossless"] = verify(servers["armed"][2], results["armed"])
    finally:
        for proc, log, _, _ in servers.values():
            stop(proc, log)
    import dmi

    run_ = dmi.open(servers["armed"][3])
    books = all(c["produced"] == c["filtered"] + c["written"] + c["dropped"] and c["in_flight"] == 0
                for c in run_.stats["hooks"].values())
    report["armed"]["file"] = {"complete": bool(run_.complete), "books_balance": books,
                               "requests": len(run_.requests), "errors": run_.stats.get("errors", [])[:3]}
    return report


def table(report: dict) -> str:
    rows = ["| mode | requests | server TTFT p50 / p99 (ms) | server TPOT p50 / p99 (ms) | client TTFT p50 / p99 (ms) "
            "| client TPOT p50 / p99 (ms) |", "|---|---|---|---|---|---|"]
    for mode, r in report.items():
        def f(k):
            v = r.get(k) or {}
            return f"{v.get('p50', float('nan')):.1f} / {v.get('p99', float('nan')):.1f}"
        rows.append(f"| {mode} | {r['requests']} | {f('server_ttft_ms')} | {f('server_tpot_ms')} | "
                    f"{f('client_ttft_ms')} | {f('client_tpot_ms')} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds of load per mode, at most")
    ap.add_argument("--model", default=None, help="model folder (default: dmi's tiny Qwen3)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", default="unarmed,armed")
    ap.add_argument("--interleave", type=int, default=0, metavar="BLOCK",
                    help="run both servers at once, alternating blocks of BLOCK requests between them")
    a = ap.parse_args(argv)
    workdir = Path(a.out or tempfile.mkdtemp(prefix="dmi-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model is None:
        from dmi.tiny import build_tiny_model

        model = str(build_tiny_model("qwen3", workdir / "tiny-qwen3"))
    if a.interleave:
        report = run_interleaved(model, a.requests, a.concurrency, a.time_limit, workdir, a.interleave)
    else:
        report = run(model, a.requests, a.concurrency, a.time_limit, workdir, tuple(a.modes.split(",")))
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
