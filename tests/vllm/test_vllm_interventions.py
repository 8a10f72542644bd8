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

DOWN = "blocks.1.hook_resid_post"
REQUESTS = {"a": [11, 12, 13, 14, 15], "b": [21, 22, 23], "c": [31, 32, 33, 34, 35, 36], "d": [41, 42]}
NEW = 5


def _vec(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).tolist()


def interventions(hidden=64):
    return [
        {"hook": "blocks.0.hook_resid_post", "op": "add", "value": _vec(hidden, 1), "scale": 3.0,
         "requests": {"ids": ["b"]}, "tokens": {"positions": [[1, 6]]}, "name": "steer-b"},
        {"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [1, 3], "requests": {"ids": ["c"]},
         "name": "ablate-c"},
        {"hook": "blocks.1.mlp.hook_post", "op": "scale", "scale": -2.0, "requests": {"ids": ["c"]},
         "tokens": {"positions": [[4, 9]]}, "name": "scale-c"},
    ]


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


def oracle(model, prompt, ivs):
    """HF, the request alone, unpadded, greedy with a KV cache; the edits as plain hooks that
    know each row's position; returns (generated tokens, DOWN rows of the fed tokens)."""
    cfg = model.config
    layers = model.model.layers
    state = {"pos": 0}
    handles, down = [], []

    def rows_edit(t, iv, heads_view=None):
        lo, hi = iv.get("tokens", {}).get("positions", [[0, 1 << 30]])[0]
        x = t[0].clone()
        view = x.unflatten(-1, heads_view) if heads_view else x
        for j in range(x.shape[0]):
            if lo <= state["pos"] + j < hi:
                if iv["op"] == "add":
                    view[j] = view[j] + iv["scale"] * torch.tensor(iv["value"])
                elif iv["op"] == "zero":
                    view[j, iv["heads"], :] = 0
                elif iv["op"] == "scale":
                    view[j] = view[j] * iv["scale"]
        return x.unsqueeze(0)

    for iv in ivs:
        layer = layers[int(iv["hook"].split(".")[1])]
        if iv["hook"].endswith("hook_resid_post"):
            handles.append(layer.register_forward_hook(
                lambda m, a, o, iv=iv: rows_edit(o, iv) if torch.is_tensor(o) else (rows_edit(o[0], iv), *o[1:])))
        elif iv["hook"].endswith("attn.hook_z"):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, iv=iv: (rows_edit(a[0], iv, (cfg.num_attention_heads, cfg.head_dim)), *a[1:])))
        else:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, iv=iv: (rows_edit(a[0], iv), *a[1:])))
    handles.append(layers[1].register_forward_hook(lambda m, a, o: down.append((o if torch.is_tensor(o) else o[0])[0])))
    seq, new = list(prompt), []
    try:
        with torch.no_grad():
            from transformers import DynamicCache

            cache = DynamicCache(config=cfg)
            feed = seq
            for _ in range(NEW):
                logits = model(torch.tensor([feed]), past_key_values=cache, use_cache=True).logits
                state["pos"] += len(feed)
                tok = int(logits[0, -1].argmax())
                new.append(tok)
                feed = [tok]
    finally:
        for h in handles:
            h.remove()
    return new, torch.cat(down)[: len(prompt) + NEW - 1]


def check(run, books, got, plain_run, plain_got, hf):
    ivs = interventions(hf.config.hidden_size)
    for rid, mine in (("b", ivs[:1]), ("c", ivs[1:])):
        tokens, down = oracle(hf, REQUESTS[rid], mine)
        assert got[rid] == tokens, (rid, got[rid], tokens)
        err = (run.get(DOWN, rid) - down).abs().max().item()
        assert err < 1e-4, (rid, err)
        assert not torch.equal(run.get(DOWN, rid), plain_run.get(DOWN, rid))
    for rid in ("a", "d"):
        assert got[rid] == plain_got[rid]
        assert torch.equal(run.get(DOWN, rid), plain_run.get(DOWN, rid)), rid
    assert books["steer-b"]["requests"] == {"b": [[1, 6]]} and books["steer-b"]["failed_rows"] == 0
    assert books["ablate-c"]["requests"] == {"c": [[0, len(REQUESTS["c"]) + NEW - 1]]}
    assert books["scale-c"]["requests"] == {"c": [[4, 9]]}
    assert run.interventions == books


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
                                                     "interventions": interventions()}})
    yield engine, sink
    shutdown(engine)


def test_compiled_steers_each_request_like_the_oracle(compiled, llm, load, tmp_path):
    engine, sink = compiled
    with dmi.attach(llm, {"hooks": [DOWN], "sink": str(tmp_path / "plain.h5")}):
        plain_got = serve(llm)  # the eager engine, unsteered
    with dmi.attach(engine) as s:
        got = serve(engine)
        stats = s.stats()
    assert stats["strict"] == [], stats["strict"]  # no dmi Python ran inside the compiled graph
    run, plain = dmi.open(sink), dmi.open(tmp_path / "plain.h5")
    hf = load("qwen3")
    ivs = interventions(hf.config.hidden_size)
    for rid, mine in (("b", ivs[:1]), ("c", ivs[1:])):
        tokens, down = oracle(hf, REQUESTS[rid], mine)
        assert got[rid] == tokens, (rid, got[rid], tokens)
        assert (run.get(DOWN, rid) - down).abs().max().item() < 1e-4
    for rid in ("a", "d"):  # compiled vs the eager engine: same tokens, rows within float noise
        assert got[rid] == plain_got[rid]
        assert (run.get(DOWN, rid) - plain.get(DOWN, rid)).abs().max().item() < 1e-5
    books = stats["interventions"]
    assert books["steer-b"]["requests"] == {"b": [[1, 6]]} and books["steer-b"]["failed_rows"] == 0
    assert books["scale-c"]["requests"] == {"c": [[4, 9]]} and books["ablate-c"]["failed_rows"] == 0
