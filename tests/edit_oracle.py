"""The engines' intervention tests share this: the requests, their interventions, and the
oracle (HF, the request alone, unpadded, greedy, the edits written as plain hooks)."""
from __future__ import annotations

import torch

DOWN = "blocks.1.hook_resid_post"
REQUESTS = {"a": [11, 12, 13, 14, 15], "b": [21, 22, 23], "c": [31, 32, 33, 34, 35, 36], "d": [41, 42],
            "e": [51, 52, 53, 54]}
STEERED = {"b": slice(0, 1), "c": slice(1, 3), "e": slice(3, 5)}  # request -> its interventions
NEW = 5


def _vec(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).tolist()


def interventions(hidden=64, intermediate=128):
    return [
        {"hook": "blocks.0.hook_resid_post", "op": "add", "value": _vec(hidden, 1), "scale": 3.0,
         "requests": {"ids": ["b"]}, "tokens": {"positions": [[1, 6]]}, "name": "steer-b"},
        {"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [1, 3], "requests": {"ids": ["c"]},
         "name": "ablate-c"},
        {"hook": "blocks.1.mlp.hook_post", "op": "scale", "scale": -2.0, "requests": {"ids": ["c"]},
         "tokens": {"positions": [[4, 9]]}, "name": "scale-c"},
        {"hook": "blocks.0.mlp.hook_post", "op": "set", "value": _vec(intermediate, 2), "requests": {"ids": ["e"]},
         "tokens": {"positions": [[2, 4]]}, "name": "set-e"},
        {"hook": "blocks.1.hook_resid_post", "op": "project_out", "value": _vec(hidden, 3),
         "requests": {"ids": ["e"]}, "name": "project-e"},
    ]


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
                elif iv["op"] == "set":
                    view[j] = torch.tensor(iv["value"])
                elif iv["op"] == "project_out":
                    u = torch.tensor(iv["value"])
                    u = u / u.norm()
                    view[j] = view[j] - (view[j] @ u) * u
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
    ivs = interventions(hf.config.hidden_size, hf.config.intermediate_size)
    for rid, mine in ((r, ivs[k]) for r, k in STEERED.items()):
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
    assert books["set-e"]["requests"] == {"e": [[2, 4]]}
    assert books["project-e"]["requests"] == {"e": [[0, len(REQUESTS["e"]) + NEW - 1]]}
    assert all(b["failed_rows"] == 0 for b in books.values())
    assert run.interventions == books
