"""Interventions on vLLM, eager (in-process) and compiled (armed at construction): a steered
request generates what HF generates with the same edit written as a plain hook on that request
alone, its downstream rows within 1e-4; requests of the same continuous batch that no
intervention selects are bit-identical to a run without interventions."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

import torch
from vllm_util import env, make_llm, shutdown

import dmi

pytestmark = pytest.mark.vllm

from edit_oracle import DOWN, NEW, REQUESTS, STEERED, _vec, check, interventions, oracle  # noqa: E402


def serve(llm) -> dict[str, list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, detokenize=False)
    for rid, p in REQUESTS.items():
        llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=p), params)
    out = {}
    while llm.llm_engine.has_unfinished_requests():
        for o in llm.llm_engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return out


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        engine = make_llm(tiny_dirs["qwen3"])
    yield engine
    shutdown(engine)


def test_eager_steers_each_request_like_the_oracle(llm, load, tmp_path):
    with dmi.attach(llm, {"hooks": [DOWN], "sink": str(tmp_path / "plain.h5")}):
        plain_got = serve(llm)
    with dmi.attach(llm, {"hooks": [DOWN], "sink": str(tmp_path / "steer.h5"),
                          "interventions": interventions()}) as s:
        got = serve(llm)
        stats = s.stats()
    check(dmi.open(tmp_path / "steer.h5"), stats["interventions"], got, dmi.open(tmp_path / "plain.h5"), plain_got,
          load("qwen3"))


def test_eager_patch_reproduces_stored_rows(llm, load, tmp_path):
    """A vLLM request patched from a run stored by HF reproduces its rows at the patched positions."""
    hf = load("qwen3")
    hook = "blocks.0.hook_resid_post"
    stored = str(tmp_path / "hf.h5")
    with dmi.attach(hf, {"hooks": [hook], "sink": stored}) as s:
        with torch.no_grad():
            hf(torch.tensor([[51, 52, 53, 54, 55, 56, 57, 58, 59, 60]]))
        s.flush()
    want = dmi.open(stored).get(hook, "0")
    with dmi.attach(llm, {"hooks": [hook], "sink": str(tmp_path / "p.h5"), "interventions": [
            {"hook": hook, "op": "patch", "value": {"run": stored, "request": "0"}, "requests": {"ids": ["b"]}}]}):
        serve(llm)
    run = dmi.open(tmp_path / "p.h5")
    pos = run.positions(hook, "b")
    assert torch.equal(run.get(hook, "b"), want[pos])


def test_bad_intervention_is_refused_before_the_workers(llm, tmp_path):
    with pytest.raises(dmi.SpecError) as e:
        dmi.attach(llm, {"hooks": [DOWN], "sink": str(tmp_path / "x.h5"),
                         "interventions": [{"hook": "blocks.0.attn.hook_v", "op": "zero"}]})
    assert e.value.field == "interventions[0].hook" and "qkv" in str(e.value)
    with pytest.raises(dmi.SpecError) as e:
        dmi.attach(llm, {"hooks": [DOWN], "sink": str(tmp_path / "x.h5"),
                         "interventions": [{"hook": DOWN, "op": "add", "value": [1.0, 2.0]}]})
    assert e.value.field == "interventions[0].value"
    assert not (tmp_path / "x.h5").exists()


@pytest.fixture(scope="module")
def compiled(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled-steer")
    sink = str(root / "armed.h5")
    # Armed at construction: the edit hooks are in the model before vLLM compiles it, so the
    # graph holds them as tensor ops over the edit table; DMI_STRICT records any dmi Python
    # inside the compiled forward.
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=1, VLLM_CACHE_ROOT=str(root / "vllm-cache"), DMI_STRICT="1"):
        engine = make_llm(tiny_dirs["qwen3"], enforce_eager=False,
                          additional_config={"dmi": {"hooks": [DOWN], "sink": sink,
                                                     "interventions": interventions()},
                                             # the API server's steering bank, as `vllm serve` arms it
                                             "dmi_serve": {"allow_interventions": True}})
    yield engine, sink
    shutdown(engine)


def test_compiled_steers_each_request_like_the_oracle(compiled, llm, load, tmp_path):
    engine, sink = compiled
    with dmi.attach(llm, {"hooks": [DOWN], "sink": str(tmp_path / "plain.h5")}):
        plain_got = serve(llm)  # the eager engine, unsteered
    hf = load("qwen3")
    with dmi.attach(engine) as s:
        _add_served_requests(engine, hf.config.hidden_size)  # steered by the served bank, in the same batches
        got = serve(engine)
        stats = s.stats()
    assert stats["strict"] == [], stats["strict"]  # no dmi Python ran inside the compiled graph
    run, plain = dmi.open(sink), dmi.open(tmp_path / "plain.h5")
    _check_served_requests(run, stats, got, hf)
    ivs = interventions(hf.config.hidden_size, hf.config.intermediate_size)
    for rid, mine in ((r, ivs[k]) for r, k in STEERED.items()):
        tokens, down = oracle(hf, REQUESTS[rid], mine)
        assert got[rid] == tokens, (rid, got[rid], tokens)
        assert (run.get(DOWN, rid) - down).abs().max().item() < 1e-4
    for rid in ("a", "d"):  # compiled vs the eager engine: same tokens, rows within float noise
        assert got[rid] == plain_got[rid]
        assert (run.get(DOWN, rid) - plain.get(DOWN, rid)).abs().max().item() < 1e-5
    books = stats["interventions"]
    assert books["steer-b"]["requests"] == {"b": [[1, 6]]} and books["steer-b"]["failed_rows"] == 0
    assert books["scale-c"]["requests"] == {"c": [[4, 9]]} and books["ablate-c"]["failed_rows"] == 0



BANK_UID = "00000000000000f1"
BANK_PROMPTS = {"g": [61, 62, 63, 64], "h": [71, 72, 73]}


def _bank_ivs(hidden):
    return [{"hook": DOWN, "op": "add", "value": _vec(hidden, 5), "scale": 2.0, "heads": None,
             "tokens": {"mode": "all", "positions": [[2, 6]], "every": 1}}]


def _add_served_requests(engine, hidden) -> None:
    """A request as dmi's API front end sends it, carrying its own interventions (the bank the
    policy arms, dmi/interventions/banks.py), and a plain one beside it."""
    import json

    from vllm import SamplingParams, TokensPrompt

    info = {"uid": BANK_UID, "tenant": "t", "kind": "generate", "n": 1, "prompts": 1, "hooks": None, "tokens": None,
            "interventions": _bank_ivs(hidden)}
    plain = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, detokenize=False)
    steered = plain.clone()
    steered.extra_args = {"dmi": json.dumps(info)}
    for rid, params in (("g", steered), ("h", plain)):
        engine.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=BANK_PROMPTS[rid]), params)


def _check_served_requests(run, stats, got, hf) -> None:
    """The served request equals the oracle with its edit; the one beside it the unedited oracle."""
    ivs = _bank_ivs(hf.config.hidden_size)
    assert stats["interventions"][f"served@{DOWN}"]["requests"] == {f"{BANK_UID}.0.0": [[2, 6]]}
    for rid, name, mine in (("g", f"{BANK_UID}.0.0", ivs), ("h", "h", [])):
        tokens, down = oracle(hf, BANK_PROMPTS[rid], mine)
        assert got[rid] == tokens, (rid, got[rid], tokens)
        assert (run.get(DOWN, name) - down).abs().max().item() < 1e-4, rid
