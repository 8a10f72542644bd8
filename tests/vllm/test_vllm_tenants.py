"""One vLLM server, two tenants with different per-request specs, through the OpenAI API.

Checks (issue 16): each tenant's rows, fetched from /v1/dmi by the id its response carries,
equal the HF oracle at exactly the positions its spec keeps; neither tenant reads the
other's requests; requests with the same client id (X-Request-Id) stay apart; n > 1 and
multi-prompt completions map to their (prompt, choice) rows; steered requests of both tenants
and unsteered ones in the same batches each equal the HF oracle with the same edit
(tests/steer_served.py); an out-of-policy spec gets a 400 naming the field and the server
keeps serving; killing the API server leaves no capture
process writing, and the file is marked incomplete with why.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_util import require_vllm

require_vllm()

from serving import Server, assert_rows_match, expected_positions, free_port

import dmi
from dmi.client import Client, DmiHTTPError

pytestmark = pytest.mark.vllm

HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]
POLICY = {"tenants": {"key-a": "alice", "key-b": "bob"}, "capture_unasked": False,
          "max_request_bytes": 200_000, "allow_interventions": True, "intervention_slots": 4}
ALICE = {"hooks": ["blocks.0.hook_resid_post"]}
BOB = {"hooks": ["blocks.1.hook_resid_post", "hook_logits"], "tokens": "decode"}


def _serve(model, sink, tmp_path, policy=POLICY):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
           "--kv-cache-memory-bytes", str(64 * 2**20), "--skip-tokenizer-init", "--enforce-eager",
           "--shutdown-timeout", "20",
           "--additional-config", json.dumps({"dmi": {"hooks": HOOKS, "sink": sink}, "dmi_serve": policy})]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    return Server(cmd, env, tmp_path / "server.log", port)


def _fed(choice) -> list[int]:
    return list(choice["prompt_token_ids"]) + list(choice["token_ids"])[:-1]


def _want(spec, choice) -> dict[str, list[int]]:
    seq, p = _fed(choice), len(choice["prompt_token_ids"])
    tokens = spec.get("tokens", "all")
    return {h: expected_positions(len(seq), p, h, tokens) for h in spec["hooks"]}


def test_two_tenants_one_server(tiny_dirs, tmp_path, load):
    model, sink = str(tiny_dirs["qwen3"]), str(tmp_path / "served.h5")
    server = _serve(model, sink, tmp_path)
    hf = load("qwen3")
    alice, bob = Client(server.base, "key-a"), Client(server.base, "key-b")
    try:
        def ask(i):
            who, spec = (alice, ALICE) if i % 2 == 0 else (bob, BOB)
            prompt = [11 + i, 12, 13, 14, 15 + i][: 3 + i % 3]
            return who, spec, who.completions(model=model, prompt=prompt, max_tokens=3 + i % 4, temperature=0,
                                               ignore_eos=True, return_token_ids=True, dmi=spec)

        # eight requests, four at a time: both tenants' requests share the engine's batches
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(8)))
        for who, spec, r in replies:
            assert r["dmi"]["tenant"] == ("alice" if who is alice else "bob")
            rows = who.rows(r)
            assert rows["__dmi__"]["complete"], rows["__dmi__"]
            assert_rows_match(rows, hf, _fed(r["choices"][0]), _want(spec, r["choices"][0]))

        # isolation: neither tenant reads the other's request, by uid or by response id
        (_, _, ra), (_, _, rb) = replies[0], replies[1]
        for other, r in ((bob, ra), (alice, rb)):
            for id_ in (r["dmi"]["id"], r["id"]):
                with pytest.raises(DmiHTTPError) as e:
                    other.manifest(id_)
                assert e.value.status == 404
        # a capability token reads without the tenant's key; a wrong one does not
        anon = Client(server.base)
        assert anon.manifest(ra["dmi"]["id"], token=ra["dmi"]["token"])["requests"][0]["id"] == ra["dmi"]["id"]
        with pytest.raises(DmiHTTPError):
            anon.manifest(ra["dmi"]["id"], token=rb["dmi"]["token"])

        # the same client id twice, at once: two requests, two uids, rows apart
        def same_id(prompt):
            req = urllib.request.Request(server.base + "/v1/completions", json.dumps(
                {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                 "return_token_ids": True, "dmi": ALICE}).encode(),
                {"Content-Type": "application/json", "Authorization": "Bearer key-a", "X-Request-Id": "dup"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())

        with ThreadPoolExecutor(2) as pool:
            dups = list(pool.map(same_id, [[41, 42, 43], [51, 52, 53, 54, 55, 56]]))
        assert dups[0]["id"] == dups[1]["id"] == "cmpl-dup"
        assert dups[0]["dmi"]["id"] != dups[1]["dmi"]["id"]
        both = alice.manifest("cmpl-dup")["requests"]
        assert sorted(x["id"] for x in both) == sorted(d["dmi"]["id"] for d in dups)
        for d in dups:
            assert_rows_match(alice.rows(d), hf, _fed(d["choices"][0]), _want(ALICE, d["choices"][0]))

        # n = 2 over two prompts: choice k of the response is (prompt k // 2, choice k % 2)
        r = bob.completions(model=model, prompt=[[61, 62, 63], [71, 72, 73, 74]], max_tokens=3, n=2,
                            temperature=1.0, seed=7, ignore_eos=True, return_token_ids=True, dmi=BOB)
        assert len(r["choices"]) == 4
        man = bob.manifest(r)["requests"][0]
        assert sorted((p["prompt"], p["choice"]) for p in man["parts"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for c in r["choices"]:
            p, j = divmod(c["index"], 2)
            assert_rows_match(bob.rows(r, prompt=p, choice=j), hf, _fed(c), _want(BOB, c))

        # inline: the last-token residual comes back in the response itself
        r = alice.completions(model=model, prompt=[81, 82, 83, 84], max_tokens=2, temperature=0, ignore_eos=True,
                              return_token_ids=True, dmi={**ALICE, "inline": True})
        (part,) = Client.inline(r)
        rows, positions = part["hooks"]["blocks.0.hook_resid_post"]
        seq = _fed(r["choices"][0])
        assert positions == [len(seq) - 1] and part["complete"]
        from reference import reference

        ref = reference(hf, seq)["blocks.0.hook_resid_post"][positions]
        assert (rows - ref).abs().max() < 1e-4

        # steering: two tenants' interventions and unsteered requests interleaved in the same batches
        import steer_served

        def steer(who, prompt, spec):
            r = who.completions(model=model, prompt=prompt, max_tokens=steer_served.NEW, temperature=0,
                                ignore_eos=True, return_token_ids=True, dmi=spec)
            return r["choices"][0]["token_ids"], r

        steer_served.run(steer, hf, {"alice": alice, "bob": bob})

        def steer_n2(who, prompt, spec):
            # (vLLM refuses n > 1 with temperature 0; top_k 1 samples the argmax)
            r = who.completions(model=model, prompt=prompt, max_tokens=steer_served.NEW, n=2, temperature=1.0,
                                top_k=1, seed=1, ignore_eos=True, return_token_ids=True, dmi=spec)
            return [(c["token_ids"], r) for c in sorted(r["choices"], key=lambda c: c["index"])]

        steer_served.run_n2(steer_n2, hf, alice)

        # out of policy: 400 naming the field; the server goes on serving
        bad = [({"hooks": ["blocks.0.hook_attn_out"]}, "dmi.hooks"), *steer_served.BAD,
               ({"sink": "/tmp/mine.h5"}, "dmi.sink"),
               ({"hooks": ["blocks.*.hook_resid_post", "hook_logits"]}, "dmi.hooks")]  # over max_request_bytes
        for spec, field in bad:
            with pytest.raises(DmiHTTPError) as e:
                alice.completions(model=model, prompt=[1, 2, 3], max_tokens=200, dmi=spec)
            assert e.value.status == 400 and e.value.field == field, (spec, e.value)
        with pytest.raises(DmiHTTPError) as e:
            Client(server.base, "key-x").completions(model=model, prompt=[1, 2], max_tokens=2)
        assert e.value.status == 401
        r = alice.completions(model=model, prompt=[91, 92], max_tokens=2, temperature=0, ignore_eos=True,
                              return_token_ids=True, dmi=ALICE)
        assert_rows_match(alice.rows(r), hf, _fed(r["choices"][0]), _want(ALICE, r["choices"][0]))

        # Killing the API server alone: the engine's capture stops and the file closes incomplete.
        import psutil

        engine_procs = psutil.Process(server.proc.pid).children(recursive=True)
        assert engine_procs
        os.kill(server.proc.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(engine_procs, timeout=60)
        assert not alive, f"left running after the front end was killed: {alive}"
    finally:
        server.stop()
    run = dmi.open(sink)
    assert not run.complete
    assert any("front end" in e for e in run.stats.get("errors", [])), run.stats.get("errors")
    # every uid's rows are apart: no row id holds two requests' positions twice
    for name in run.requests:
        pos = run.positions("blocks.0.hook_resid_post", name) if "blocks.0.hook_resid_post" in run.hooks else None
        if pos is not None and len(pos):
            assert pos.unique().numel() == pos.numel(), name


def test_chat_choices_map_to_their_rows(tiny_dirs, tmp_path, load):
    """Chat: choice j of the response is row id <uid>.0.j; each equals the oracle over the
    tokens the chat template made (the response's prompt_token_ids)."""
    import shutil

    from dmi.tiny import build_byte_tokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_dirs["qwen3"], model)
    build_byte_tokenizer(model)
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    sink, port = str(tmp_path / "chat.h5"), free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
           "--kv-cache-memory-bytes", str(64 * 2**20), "--enforce-eager", "--chat-template", str(template),
           "--additional-config", json.dumps({"dmi": {"hooks": HOOKS, "sink": sink}})]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    server = Server(cmd, env, tmp_path / "server.log", port)
    hf = load("qwen3")
    try:
        c = Client(server.base)
        r = c.chat(model=str(model), messages=[{"role": "user", "content": "hi there"}], max_tokens=3, n=2,
                   temperature=1.0, seed=3, ignore_eos=True, return_token_ids=True,
                   dmi={"hooks": ["blocks.1.hook_resid_post"]})
        prompt = r["prompt_token_ids"]
        assert len(r["choices"]) == 2 and r["id"].startswith("chatcmpl-")
        man = c.manifest(r)["requests"][0]
        assert sorted(p["name"] for p in man["parts"]) == [f"{r['dmi']['id']}.0.0", f"{r['dmi']['id']}.0.1"]
        for ch in r["choices"]:
            seq = list(prompt) + list(ch["token_ids"])[:-1]
            assert_rows_match(c.rows(r, prompt=0, choice=ch["index"]), hf, seq,
                              {"blocks.1.hook_resid_post": list(range(len(seq)))})
    finally:
        server.stop()
