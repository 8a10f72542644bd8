"""Steering through a served API, shared by the vLLM and SGLang tenant tests: two tenants'
requests with different interventions and unsteered ones, interleaved in the same batches;
each one's generated tokens and downstream rows equal the HF oracle applying the same edit
as a plain forward hook on that request alone (tests/edit_oracle.py), the unsteered ones the
unedited oracle, and each response says what was applied."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from edit_oracle import DOWN, NEW, _vec, oracle

HOOK = "blocks.0.hook_resid_post"


def kinds(hidden: int) -> list[tuple[str, list | None]]:
    """(tenant, interventions) per request kind: alice adds a vector, bob scales some positions."""
    add = [{"hook": HOOK, "op": "add", "value": _vec(hidden, 11), "scale": 2.0}]
    scale = [{"hook": HOOK, "op": "scale", "scale": 0.5, "tokens": {"positions": [[2, 6]]}}]
    return [("alice", add), ("bob", scale), ("alice", None)]


def run(ask, hf, clients: dict, n: int = 6) -> None:
    """ask(client, prompt, dmi) -> (generated token ids, the response carrying "dmi")."""
    cases = kinds(hf.config.hidden_size)

    def one(i):
        tenant, ivs = cases[i % len(cases)]
        prompt = [20 + 7 * i, 12, 13, 14, 15, 16][: 3 + i % 4]  # distinct first tokens: no shared prefix
        spec = {"hooks": [DOWN], **({"interventions": ivs} if ivs else {})}
        return tenant, ivs, prompt, *ask(clients[tenant], prompt, spec)

    with ThreadPoolExecutor(4) as pool:  # steered and plain requests of both tenants share batches
        replies = list(pool.map(one, range(n)))
    for tenant, ivs, prompt, generated, resp in replies:
        tokens, down = oracle(hf, prompt, ivs or [])
        assert list(generated) == tokens, (tenant, ivs is not None, generated, tokens)
        rows = clients[tenant].rows(resp)
        fed = len(prompt) + NEW - 1
        assert rows[DOWN + ".positions"].tolist() == list(range(fed))
        err = (rows[DOWN] - down).abs().max().item()
        assert err < 1e-4, (tenant, err)
        report = resp["dmi"].get("interventions")
        if ivs is None:
            assert report is None
            continue
        plain = oracle(hf, prompt, [])[1]
        assert not torch.allclose(rows[DOWN], plain, atol=1e-4)  # the edit did something
        lo, hi = ivs[0].get("tokens", {}).get("positions", [[0, fed]])[0]
        (item,) = report
        assert item["applied"] is True and item["rows"] == min(hi, fed) - lo, item
        assert item["parts"] == [{"prompt": 0, "choice": 0, "positions": [[lo, min(hi, fed)]]}], item


BAD = [({"interventions": [{"hook": "hook_logits", "op": "scale", "scale": 2.0}]}, "dmi.interventions[0].hook"),
       ({"interventions": [{"hook": HOOK, "op": "project_out", "value": [1.0]}]}, "dmi.interventions[0].op"),
       ({"interventions": [{"hook": HOOK, "op": "add", "value": [1.0, 2.0]}]}, "dmi.interventions[0].value"),
       ({"interventions": [{"hook": HOOK, "op": "add", "value": {"file": "/etc/passwd"}}]},
        "dmi.interventions[0].value")]


def run_n2(ask_n, hf, client) -> None:
    """n = 2, greedy (both choices are the oracle's): every choice steered, the prompt it shares
    with its sibling too, and the report covers both. ask_n(client, prompt, dmi) -> [(generated
    token ids, the response item carrying "dmi")] per choice."""
    ivs = kinds(hf.config.hidden_size)[0][1]
    prompt = [97, 12, 13, 14]
    outs = ask_n(client, prompt, {"hooks": [DOWN], "interventions": ivs})
    tokens, down = oracle(hf, prompt, ivs)
    fed = len(prompt) + NEW - 1
    for j, (generated, item) in enumerate(outs):
        assert list(generated) == tokens, (j, generated, tokens)
        rows = client.rows(item, prompt=0, choice=j)
        assert rows[DOWN + ".positions"].tolist() == list(range(fed))
        assert (rows[DOWN] - down).abs().max().item() < 1e-4, j
    (report,) = outs[0][1]["dmi"]["interventions"]
    assert report["applied"] is True, report
    assert {(p["prompt"], p["choice"]) for p in report["parts"]} >= {(0, 0), (0, 1)}, report
