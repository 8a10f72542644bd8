"""dmi's adapter conformance kit, run against the toy engine's adapter."""
from __future__ import annotations

import string

from dmi.testing import ConformanceCase, module_fingerprint, run_conformance
from toy_oracle import reference

from dmi_toyengine import Engine
from dmi_toyengine.adapter import ToyAdapter

HOOKS = [
    "hook_embed",
    "blocks.*.hook_resid_pre",
    "blocks.*.attn.hook_q",
    "blocks.*.attn.hook_k",
    "blocks.*.attn.hook_v",
    "blocks.*.attn.hook_z",
    "blocks.*.hook_attn_out",
    "blocks.*.hook_resid_mid",
    "blocks.*.mlp.hook_post",
    "blocks.*.hook_mlp_out",
    "blocks.*.hook_resid_post",
    "ln_final.hook_out",
    "hook_logits",
]


def request_ids(n: int) -> list[str]:
    return [f"req-{string.ascii_lowercase[i]}" for i in range(n)]


def serve(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> dict[str, list[int]]:
    """Online-style arrivals, one new request per step, so prefills land in the same flat batch as
    other requests' decodes and finished requests hand their slot to waiting ones.
    Returns {request id: generated tokens}."""
    pending = list(zip(request_ids(len(prompts)), prompts))
    out: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        if pending:
            engine.add_request(*pending.pop(0), max_new_tokens)
        for req in engine.step():
            out[req.request_id] = req.generated
    return out


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> dict[str, list[int]]:
    """What the engine computed per request: the prompt, then every generated token but the last
    (the last one is sampled and never fed back)."""
    generated = serve(engine, prompts, max_new_tokens)
    return {rid: list(p) + generated[rid][:-1] for rid, p in zip(request_ids(len(prompts)), prompts)}


def make_engine() -> Engine:
    return Engine(max_batch=2, seed=0)  # 5 prompts through 2 slots: requests wait, join and leave


def concrete_hooks() -> list[str]:
    """The kit compares hook by hook, so it wants concrete names, not the globs above."""
    names = ToyAdapter(make_engine()).resolve(HOOKS)
    assert len(names) == 3 + 10 * make_engine().config.n_layers
    return names


def fingerprint(engine: Engine):
    """The kit's default (module hooks and attributes) misses a listener left in the engine's list."""
    return module_fingerprint(engine), list(engine.step_listeners)


def test_conformance(tmp_path):
    report = run_conformance(ConformanceCase(make_engine=make_engine, generate=generate, reference=reference,
                                             hooks=concrete_hooks(), fingerprint=fingerprint), tmp_path)
    assert set(report) == {"second_session_refused", "capture_changes_nothing", "detach_restores",
                           "flush_and_books", "attribution", "bad_input_refused"}


def test_oracle_agrees_with_the_engine():
    """The oracle is only worth trusting if its greedy continuation is the engine's own."""
    engine = make_engine()
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4], [1]]
    generated = serve(engine, prompts, 5)
    for rid, prompt in zip(request_ids(len(prompts)), prompts):
        logits = reference(engine, prompt + generated[rid][:-1])["hook_logits"]
        assert logits[len(prompt) - 1:].argmax(-1).tolist() == generated[rid]
