"""One SGLang server (`python -m sglang.launch_server`, armed through DMI_SPEC / DMI_SERVE),
two tenants with different per-request specs (issue 16): each tenant's rows, fetched from
/v1/dmi by the id its response carries, equal the HF oracle at exactly the positions its
spec keeps; neither reads the other's; a rid sent again never merges two requests; n > 1
maps to (prompt, choice) rows, the shared prompt filled from the request's own prefill;
steered requests of both tenants and unsteered ones in the same batches each equal the HF
oracle with the same edit (tests/steer_served.py); an out-of-policy spec gets a 400 naming
the field and the server keeps serving."""
from __future__ import annotations

import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from sglang_env import require_sglang

from serving import Server, assert_rows_match, expected_positions, free_port

import dmi
from dmi.client import Client, DmiHTTPError

pytestmark = pytest.mark.sglang

HOOKS = ["blocks.*.hook_resid_post", "hook_logits"]
POLICY = {"tenants": {"key-a": "alice", "key-b": "bob"}, "capture_unasked": False, "max_request_bytes": 200_000,
          "allow_interventions": True, "intervention_slots": 4}
ALICE = {"hooks": ["blocks.0.hook_resid_post"]}
BOB = {"hooks": ["blocks.1.hook_resid_post", "hook_logits"], "tokens": "decode"}
SAMPLING = {"temperature": 0, "ignore_eos": True}


def _want(spec, prompt, out) -> dict[str, list[int]]:
    seq = list(prompt) + list(out["output_ids"])[:-1]
    return {h: expected_positions(len(seq), len(prompt), h, spec.get("tokens", "all")) for h in spec["hooks"]}


def _fed(prompt, out):
    return list(prompt) + list(out["output_ids"])[:-1]


def test_two_tenants_one_server(sgl_tiny, hf_model, tmp_path):
    require_sglang()
    sink = str(tmp_path / "served.h5")
    port = free_port()
    env = {**os.environ, "DMI_SPEC": json.dumps({"hooks": HOOKS, "sink": sink}), "DMI_SERVE": json.dumps(POLICY)}
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(sgl_tiny("qwen3")), "--device", "cpu",
           "--skip-tokenizer-init", "--disable-cuda-graph", "--attention-backend", "torch_native",
           "--max-total-tokens", "4096", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error"]
    server = Server(cmd, env, tmp_path / "server.log", port)
    hf = hf_model("qwen3")
    alice, bob = Client(server.base, "key-a"), Client(server.base, "key-b")
    try:
        def ask(i):
            who, spec = (alice, ALICE) if i % 2 == 0 else (bob, BOB)
            # distinct first tokens: the radix cache shares no prefix between requests
            prompt = [20 + 10 * i, 12, 13, 14, 15][: 3 + i % 3]
            return who, spec, prompt, who.generate(input_ids=prompt, sampling_params={
                "max_new_tokens": 3 + i % 4, **SAMPLING}, dmi=spec)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(6)))
        for who, spec, prompt, r in replies:
            assert r["dmi"]["tenant"] == ("alice" if who is alice else "bob")
            rows = who.rows(r)
            assert rows["__dmi__"]["complete"], rows["__dmi__"]
            assert_rows_match(rows, hf, _fed(prompt, r), _want(spec, prompt, r))

        (_, _, _, ra), (_, _, _, rb) = replies[0], replies[1]
        for other, r in ((bob, ra), (alice, rb)):
            for id_ in (r["dmi"]["id"], r["meta_info"]["id"]):
                with pytest.raises(DmiHTTPError) as e:
                    other.manifest(id_)
                assert e.value.status == 404

        # the same rid again once the first ended: SGLang takes it; dmi keeps the two apart
        outs = []
        for prompt in ([91, 92, 93], [101, 102, 103, 104, 105]):
            outs.append((prompt, alice.generate(input_ids=prompt, rid="dup", dmi=ALICE,
                                                sampling_params={"max_new_tokens": 4, **SAMPLING})))
        assert outs[0][1]["meta_info"]["id"] == outs[1][1]["meta_info"]["id"] == "dup"
        assert len(alice.manifest("dup")["requests"]) == 2
        for prompt, r in outs:
            assert_rows_match(alice.rows(r), hf, _fed(prompt, r), _want(ALICE, prompt, r))

        # n = 2 over two prompts: item k is (prompt k // 2, choice k % 2); the prompt's rows come
        # from the request's own prefill ("<uid>.<p>.prefix"), which the choices share
        prompts = [[111, 62, 63], [121, 72, 73, 74]]
        r = bob.generate(input_ids=prompts, sampling_params={"max_new_tokens": 3, "n": 2, **SAMPLING},
                         dmi={**BOB, "tokens": "all"})
        assert len(r) == 4
        man = bob.manifest(r[0]["dmi"]["id"], token=r[0]["dmi"]["token"])["requests"][0]
        assert sorted(str(p["choice"]) + str(p["prompt"]) for p in man["parts"]) == \
            ["00", "01", "10", "11", "prefix0", "prefix1"]
        for k, out in enumerate(r):
            p, j = divmod(k, 2)
            rows = bob.rows(out, prompt=p, choice=j)
            assert rows["__dmi__"]["complete"], json.dumps(rows["__dmi__"])
            assert_rows_match(rows, hf, _fed(prompts[p], out), _want({**BOB, "tokens": "all"}, prompts[p], out))

        import steer_served

        def steer(who, prompt, spec):
            r = who.generate(input_ids=prompt, sampling_params={"max_new_tokens": steer_served.NEW, **SAMPLING},
                             dmi=spec)
            return r["output_ids"], r

        steer_served.run(steer, hf, {"alice": alice, "bob": bob})

        def steer_n2(who, prompt, spec):
            r = who.generate(input_ids=prompt, sampling_params={"max_new_tokens": steer_served.NEW, "n": 2,
                                                                **SAMPLING}, dmi=spec)
            return [(out["output_ids"], out) for out in r]

        steer_served.run_n2(steer_n2, hf, alice)

        bad = [({"hooks": ["blocks.0.hook_attn_out"]}, "dmi.hooks"), *steer_served.BAD,
               ({"sink": "/tmp/mine.h5"}, "dmi.sink"),
               ({"tokens": "sometimes"}, "dmi.tokens.mode")]
        for spec, field in bad:
            with pytest.raises(DmiHTTPError) as e:
                alice.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2}, dmi=spec)
            assert e.value.status == 400 and e.value.field == field, (spec, e.value)
        prompt = [131, 132]
        r = alice.generate(input_ids=prompt, sampling_params={"max_new_tokens": 2, **SAMPLING}, dmi=ALICE)
        assert_rows_match(alice.rows(r), hf, _fed(prompt, r), _want(ALICE, prompt, r))

        import psutil

        engine_procs = psutil.Process(server.proc.pid).children(recursive=True)
        assert engine_procs
        os.kill(server.proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(engine_procs, timeout=60)
        assert not alive, f"left running after the front end was killed: {alive}"
    finally:
        server.stop(signal.SIGTERM)
    run = dmi.open(sink)
    assert not run.complete


def test_openai_completions_map_choices_to_rows(sgl_tiny, hf_model, tmp_path):
    """SGLang's /v1/completions (the spec through custom_params): prompts x n choices, choice k
    of the response is row id <uid>.<k // n>.<k % n>, each equal to the oracle."""
    require_sglang()
    import shutil

    from dmi.tiny import build_byte_tokenizer

    model = tmp_path / "model"
    shutil.copytree(sgl_tiny("qwen3"), model)
    build_byte_tokenizer(model)
    sink, port = str(tmp_path / "oa.h5"), free_port()
    env = {**os.environ, "DMI_SPEC": json.dumps({"hooks": HOOKS, "sink": sink})}
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
           "--disable-cuda-graph", "--attention-backend", "torch_native", "--max-total-tokens", "4096",
           "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    server = Server(cmd, env, tmp_path / "server.log", port)
    hf = hf_model("qwen3")
    try:
        c = Client(server.base)
        prompts = [[141, 62, 63], [151, 72, 73, 74]]
        spec = {"hooks": ["blocks.0.hook_resid_post"]}
        r = c.completions(model="default", prompt=prompts, max_tokens=3, n=2, temperature=0, ignore_eos=True,
                          return_token_ids=True, custom_params={"dmi": json.dumps(spec)})
        assert len(r["choices"]) == 4
        for ch in r["choices"]:
            p, j = divmod(ch["index"], 2)
            rows = c.rows(r, prompt=p, choice=j)
            assert rows["__dmi__"]["name"] == f"{r['dmi']['id']}.{p}.{j}"
            seq = prompts[p] + list(ch["token_ids"])[:-1]
            assert_rows_match(rows, hf, seq, {"blocks.0.hook_resid_post": list(range(len(seq)))})
    finally:
        server.stop(signal.SIGTERM)
