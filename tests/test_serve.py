"""dmi.serve without an engine server: per-request masks in the plan (real capture on the HF
engine, against the oracle), the request parser and policy (400s naming the field), and the
ASGI front end against a stub app (injection, the `dmi` object, route isolation)."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch
from helpers import assert_books_balance, fed_sequences, left_pad
from reference import reference

import dmi
from dmi.errors import SpecError
from dmi.plan.rows import DECODE, PREFILL, RowTable
from dmi.serve import request as rq
from dmi.serve.engine import RequestTable
from dmi.serve.hooks import Served
from dmi.serve.names import parse_row_name, row_name
from dmi.serve.policy import ServePolicy

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
PAD, NO_EOS, NEW = 257, 319, 3
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_request_masks_keep_each_requests_own_hooks_and_tokens(load, out):
    """Request 0 asks for layer 0 only; request 1 for layer 1 at the decode rows; request 2
    takes the armed spec. Each request's rows, per hook, are exactly those, equal to HF."""
    model = load("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    asks = {"0": {"uid": "u", "hooks": [HOOKS[0]]}, "1": {"uid": "u", "hooks": [HOOKS[1]], "tokens": {"mode": "decode"}}}
    with dmi.attach(model, dmi.CaptureSpec(hooks=HOOKS, sink=out)) as s:
        table = RequestTable(s.names)
        for name, info in asks.items():
            table.add(name, info)
        s.planner.enable_request_masks(table.masks)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=PAD, eos_token_id=NO_EOS)
    run = dmi.open(out)
    assert_books_balance(run.stats)
    seqs = fed_sequences(gen, PROMPTS)
    for rid, seq in enumerate(seqs):
        p = len(PROMPTS[rid])
        want = {"0": {HOOKS[0]: list(range(len(seq))), HOOKS[1]: []},
                "1": {HOOKS[0]: [], HOOKS[1]: list(range(p, len(seq)))},
                "2": {h: list(range(len(seq))) for h in HOOKS}}[str(rid)]
        ref = reference(model, seq)
        for hook, positions in want.items():
            pos = run.positions(hook, str(rid)).tolist() if str(rid) in run.requests else []
            assert pos == positions, (rid, hook, pos)
            if positions:
                err = (run.get(hook, str(rid)) - ref[hook][positions]).abs().max().item()
                assert err < 1e-4, (rid, hook, err)
    # rows no request asked for are filtered, never dropped
    assert all(c["dropped"] == 0 for c in run.stats["hooks"].values())


def test_request_table_masks_match_a_row_by_row_reading():
    names = ["a", "b", "c"]
    t = RequestTable(names)
    t.add("r0", {"hooks": ["a"], "tokens": {"mode": "last"}})
    t.add("r1", {"hooks": ["b", "c"]})
    t.add("r2", {"hooks": None, "tokens": {"mode": "prefill"}})
    rows = RowTable(batch=1, tokens=8, request_ids=["r0", "r1", "r2", "other"],
                    request=np.array([0, 0, 1, 2, 2, 3, -1, 0], np.int32),
                    position=np.array([0, 1, 5, 0, 1, 7, 0, 2], np.int64),
                    phase=np.array([PREFILL] * 3 + [PREFILL, DECODE, DECODE, PREFILL, PREFILL], np.int8))
    m = t.masks("tokens", rows)
    want = np.zeros((3, 8), bool)
    want[0, 7] = True                  # r0: hook a, its last row in the step
    want[1:, 2] = True                 # r1: hooks b, c, every row
    want[:, 3] = True                  # r2: every hook, prefill rows only
    want[:, 5] = True                  # "other" asked nothing of its own: the armed spec
    assert (m == want).all(), m.astype(int)
    assert RequestTable(names).masks("tokens", rows) is None  # nobody asked: the plan is untouched


def test_row_names_round_trip():
    assert parse_row_name(row_name("0123456789abcdef", 2, 1)) == ("0123456789abcdef", 2, 1)
    assert parse_row_name(row_name("0123456789abcdef", 0, "prefix")) == ("0123456789abcdef", 0, "prefix")
    assert parse_row_name("cmpl-x-0") is None and parse_row_name("0123456789abcdef.0.odd") is None


def test_vllm_engine_ids_map_to_prompt_and_choice():
    from dmi.adapters.vllm.worker import served_name

    uid = "0123456789abcdef"
    assert served_name("cmpl-dup-1-abcdef12", {"uid": uid, "kind": "completions", "n": 1}) == f"{uid}.1.0"
    assert served_name("1_cmpl-x_y-2-abcdef12", {"uid": uid, "kind": "completions", "n": 2}) == f"{uid}.2.1"
    assert served_name("chatcmpl-9-abcdef12", {"uid": uid, "kind": "chat", "n": 1}) == f"{uid}.0.0"
    assert served_name("3_chatcmpl-9-abcdef12", {"uid": uid, "kind": "chat", "n": 4}) == f"{uid}.0.3"


SERVED = Served(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_logits"],
                {"blocks.0.hook_resid_post": 256, "blocks.1.hook_resid_post": 256, "hook_logits": 1280}, 2,
                shapes={"blocks.0.hook_resid_post": (64,), "blocks.1.hook_resid_post": (64,), "hook_logits": (320,)},
                not_editable={"hook_logits": "its rows are not the step's token rows"})
STEERABLE = SERVED.narrow(None).steer(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])


@pytest.mark.parametrize("given, field", [
    ({"hooks": ["blocks.0.hook_attn_out"]}, "dmi.hooks"),
    ({"hooks": []}, "dmi.hooks"),
    ({"sink": "x.h5"}, "dmi.sink"),
    ({"plugin": "x"}, "dmi.plugin"),
    ({"tokens": "sometimes"}, "dmi.tokens.mode"),
    ({"tokens": {"positions": [[3, 1]]}}, "dmi.tokens.positions"),
    ({"inline": {"positions": "first"}}, "dmi.inline.positions"),
    ({"inline": {"hooks": ["hook_logits"]}, "hooks": ["blocks.0.hook_resid_post"]}, "dmi.inline.hooks"),
    ({"interventions": [{"hook": "blocks.0.hook_resid_post", "op": "add"}]}, "dmi.interventions"),
    ("{not json", "dmi"),
    (7, "dmi"),
])
def test_bad_request_specs_name_the_field(given, field):
    with pytest.raises(rq.RequestError) as e:
        rq.check(rq.parse(given), ServePolicy(), SERVED)
    assert e.value.field == field and e.value.status == 400, e.value


def test_policy_bounds_hooks_and_interventions():
    p = ServePolicy.parse({"hooks": ["blocks.*.hook_resid_post"], "allow_interventions": True})
    served = SERVED.narrow(p.hooks)
    assert served.allowed == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(rq.RequestError) as e:
        rq.check(rq.parse({"hooks": ["hook_logits"]}), p, served)
    assert e.value.field == "dmi.hooks"
    for bad, field in [({"retention": 3}, "dmi_serve.retention"), ({"max_request_bytes": 0}, "dmi_serve.max_request_bytes"),
                       ("[", "dmi_serve"), ({"intervention_slots": 0}, "dmi_serve.intervention_slots"),
                       ({"intervention_hooks": ["blocks.0.hook_resid_post"]}, "dmi_serve.intervention_hooks"),
                       ({"allow_interventions": True, "intervention_hooks": []}, "dmi_serve.intervention_hooks")]:
        with pytest.raises(SpecError) as e:
            ServePolicy.parse(bad)
        assert e.value.field == field
    with pytest.raises(SpecError) as e:
        SERVED.narrow(["blocks.0.hook_attn_out"])
    assert e.value.field == "dmi_serve.hooks"


def test_policy_intervention_hooks_lie_within_the_armed_spec():
    armed = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_logits"]
    assert ServePolicy.parse({"allow_interventions": True}).bank_hooks(armed) == armed[:2]
    assert ServePolicy.parse({}).bank_hooks(armed) == []
    p = ServePolicy.parse({"allow_interventions": True, "intervention_hooks": ["blocks.1.*"]})
    assert p.bank_hooks(armed) == ["blocks.1.hook_resid_post"]
    for policy, names in [({"allow_interventions": True}, ["hook_logits"]),
                          ({"allow_interventions": True, "intervention_hooks": ["blocks.0.hook_attn_out"]}, armed)]:
        with pytest.raises(SpecError) as e:
            ServePolicy.parse(policy).bank_hooks(names)
        assert e.value.field == "dmi_serve.intervention_hooks"
    with pytest.raises(SpecError) as e:  # logits rows are per request, not the step's token rows
        SERVED.steer(["hook_logits"])
    assert e.value.field == "dmi_serve.intervention_hooks"


ADD = [0.5] * 64


@pytest.mark.parametrize("iv, field", [
    ({"hook": "blocks.1.hook_resid_post", "op": "melt"}, "dmi.interventions[0].op"),
    ({"hook": "blocks.1.hook_resid_post", "op": "replace", "value": ADD}, "dmi.interventions[0].op"),
    ({"hook": "blocks.1.hook_resid_post", "op": "project_out", "value": ADD}, "dmi.interventions[0].op"),
    ({"hook": "blocks.1.hook_resid_post", "op": "patch", "value": {"run": "/x.h5", "request": "a"}},
     "dmi.interventions[0].op"),
    ({"hook": "hook_logits", "op": "scale", "scale": 2.0}, "dmi.interventions[0].hook"),
    ({"hook": "blocks.1.hook_resid_post", "op": "add"}, "dmi.interventions[0].value"),
    ({"hook": "blocks.1.hook_resid_post", "op": "add", "value": [1.0] * 63}, "dmi.interventions[0].value"),
    ({"hook": "blocks.1.hook_resid_post", "op": "add", "value": [float("nan")] * 64}, "dmi.interventions[0].value"),
    ({"hook": "blocks.1.hook_resid_post", "op": "add", "value": "/etc/vec.npy"}, "dmi.interventions[0].value"),
    ({"hook": "blocks.1.hook_resid_post", "op": "add", "value": {"file": "/etc/v.npy"}}, "dmi.interventions[0].value"),
    ({"hook": "blocks.1.hook_resid_post", "op": "scale"}, "dmi.interventions[0].scale"),
    ({"hook": "blocks.1.hook_resid_post", "op": "scale", "scale": float("inf")}, "dmi.interventions[0].scale"),
    ({"hook": "blocks.1.hook_resid_post", "op": "zero", "heads": [0]}, "dmi.interventions[0].heads"),
    ({"hook": "blocks.1.hook_resid_post", "op": "zero", "requests": {"ids": ["other"]}},
     "dmi.interventions[0].requests"),
    ({"hook": "blocks.1.hook_resid_post", "op": "zero", "tokens": "sometimes"}, "dmi.interventions[0].tokens.mode"),
])
def test_bad_interventions_name_the_field(iv, field):
    p = ServePolicy.parse({"allow_interventions": True})
    with pytest.raises(rq.RequestError) as e:
        rq.check(rq.parse({"interventions": [iv]}), p, STEERABLE)
    assert e.value.field == field and e.value.status == 400, e.value


def test_interventions_are_checked_and_sent_to_the_engine():
    p = ServePolicy.parse({"allow_interventions": True})
    ivs = [{"hook": "blocks.1.hook_resid_post", "op": "add", "value": ADD, "scale": 2, "tokens": "decode"},
           {"hook": "blocks.1.hook_resid_post", "op": "scale", "scale": 0.5, "tokens": "decode"},
           {"hook": "blocks.0.hook_resid_post", "op": "zero"}]
    sent = rq.check(rq.parse({"interventions": ivs}), p, STEERABLE).engine_info("u", "t", "completions", 1, 1)
    assert [x["op"] for x in sent["interventions"]] == ["add", "scale", "zero"]
    assert sent["interventions"][0]["tokens"]["mode"] == "decode" and sent["interventions"][2]["tokens"] is None
    # one hook's edits compose into one affine per row: they share one tokens filter
    with pytest.raises(rq.RequestError) as e:
        rq.check(rq.parse({"interventions": [ivs[0], {**ivs[1], "tokens": "all"}]}), p, STEERABLE)
    assert e.value.field == "dmi.interventions[1].tokens"
    with pytest.raises(rq.RequestError) as e:  # forbidden by policy
        rq.check(rq.parse({"interventions": ivs}), ServePolicy(), STEERABLE)
    assert e.value.field == "dmi.interventions"


def test_intervention_report_reads_the_books():
    from dmi.serve.steer import report

    U, V = "0123456789abcdef", "fedcba9876543210"

    ivs = [{"hook": "blocks.1.hook_resid_post", "op": "add"}, {"hook": "blocks.0.hook_resid_post", "op": "zero"}]
    books = {"served@blocks.1.hook_resid_post": {"requests": {f"{U}.0.0": [[0, 5]], f"{V}.0.0": [[0, 9]]},
                                                   "failed": {"prefix_cache": {f"{U}.0.1": [[0, 3]]}}},
             "served@blocks.0.hook_resid_post": {"requests": {}, "failed": {}}}
    got = report(books, U, ivs)
    # choice 1 took prompt positions 0..2 from its sibling's cache, which edited them: shared, not missed
    assert got[0]["rows"] == 5 and got[0]["parts"] == [
        {"prompt": 0, "choice": 0, "positions": [[0, 5]]},
        {"prompt": 0, "choice": 1, "positions": [], "shared_prompt_positions": [[0, 3]]}]
    assert got[0]["not_applied"] == [] and got[0]["applied"] is True
    assert got[1]["applied"] is False and "tokens" in got[1]["why"]
    books[f"served@{ivs[0]['hook']}"]["failed"] = {"prefix_cache": {f"{U}.1.0": [[0, 2]]}, "no_slot": {f"{U}.0.0": [[5, 6]]}}
    got = report(books, U, ivs)
    assert got[0]["applied"] is False and sorted(x["reason"] for x in got[0]["not_applied"]) == ["no_slot",
                                                                                              "prefix_cache"]
    assert report(books, V, ivs[:1])[0]["applied"] is True
    assert report({}, U, ivs[:1])[0]["applied"] is False


def test_banks_edit_only_their_requests_rows():
    """The engine side without an engine: two steering requests and a plain one in one step;
    each steered row equals the plain statement of its edits, every other row is x itself."""
    from types import SimpleNamespace

    from dmi.interventions.banks import Banks
    from dmi.kernels.edit_op import apply_points, reference
    from dmi.plan.edits import EditTable

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    bindings = [SimpleNamespace(name=h, row_shape=(8,), dtype=torch.float32) for h in hooks]
    banks = Banks(bindings, 2, "cpu", 0, 0)
    table = RequestTable(hooks, banks)
    v = torch.randn(8, generator=torch.Generator().manual_seed(0))
    a = [{"hook": hooks[1], "op": "add", "value": v.tolist(), "scale": None, "heads": None,
          "tokens": {"mode": "all", "positions": [[2, 4]], "every": 1}}]
    b = [{"hook": hooks[1], "op": "scale", "scale": -2.0, "value": None, "heads": None, "tokens": None},
         {"hook": hooks[0], "op": "zero", "value": None, "scale": None, "heads": None, "tokens": None}]
    for name, ivs in (("ua.0.0", a), ("ub.0.0", b), ("uc.0.0", None)):
        table.add(name, {"uid": name[:2], "hooks": None, "interventions": ivs})
    rows = RowTable(batch=1, tokens=15, request_ids=["ua.0.0", "ub.0.0", "uc.0.0"],
                    request=np.repeat(np.arange(3, dtype=np.int32), 5), position=np.tile(np.arange(5), 3),
                    phase=np.zeros(15, np.int8))
    edit = EditTable(2, "cpu", 32)
    edit.host[:] = -1
    applied = banks.plan(0, rows, edit.host)
    assert applied[0].tolist() == list(range(5, 10)) and applied[1].tolist() == [2, 3] + list(range(5, 10))
    x = torch.randn(15, 8)
    pts = [SimpleNamespace(slot=j, kind="bank", values=banks.values[j], scale=1.0, head_mask=None) for j in range(2)]
    y0 = apply_points(x, pts[:1], edit.sel)
    y1 = apply_points(x, pts[1:], edit.sel)
    assert torch.equal(y1[2:4], reference(x[2:4], "add", v, None, None)) and torch.equal(y1[[0, 1, 4]], x[[0, 1, 4]])
    assert torch.equal(y1[5:10], reference(x[5:10], "scale", None, -2.0, None))
    assert torch.equal(y0[5:10], torch.zeros(5, 8)) and torch.equal(y0[:5], x[:5])
    assert torch.equal(y0[10:], x[10:]) and torch.equal(y1[10:], x[10:])  # the plain request: bit-identical
    # a third steering request while both slots are held by requests of this step: booked, never run
    table.add("ud.0.0", {"uid": "ud", "hooks": None, "interventions": a})
    from dmi.interventions.books import Books

    banks.books = Books([{"name": f"served@{h}", "hook": h, "op": "served", "hooks": [h], "capture": "after"}
                         for h in hooks])
    rows4 = RowTable(batch=1, tokens=4, request_ids=["ua.0.0", "ub.0.0", "ud.0.0"],
                     request=np.array([0, 1, 2, 2], np.int32), position=np.array([2, 0, 2, 3]),
                     phase=np.zeros(4, np.int8))
    edit.host[:] = -1
    banks.plan(1, rows4, edit.host)
    assert edit.host[2:4, 1].tolist() == [-1, -1]
    assert banks.books.snapshot()[f"served@{hooks[1]}"]["failed"] == {"no_slot": {"ud.0.0": [[2, 4]]}}
    # once a request ends its slot is free for the next
    table.forget("ua.0.0")
    edit.host[:] = -1
    banks.plan(2, RowTable(batch=1, tokens=1, request_ids=["ud.0.0"], request=np.zeros(1, np.int32),
                           position=np.array([3]), phase=np.ones(1, np.int8)), edit.host)
    assert edit.host[0, 1] == banks.slot_of["ud"]


# -- the ASGI front end against a stub engine app ------------------------------------------------

def _front(policy, served=SERVED):
    from dmi.serve.asgi import DmiMiddleware, Front

    front = Front("vllm", {}, ServePolicy.parse(policy), served, None, 64)
    seen = []

    async def app(scope, receive, send):
        body = json.loads((await receive())["body"])
        seen.append(body)
        out = json.dumps({"id": "cmpl-same", "choices": [{"index": 0}]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    return DmiMiddleware(app, front), front, seen


def _call(mw, method, path, body=None, key=None, token=None, query=b""):
    headers = [(b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if token:
        headers.append((b"x-dmi-token", token.encode()))
    sent = []

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode() if body is not None else b"",
                "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": query}
    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(data) if data else None


def test_front_end_injects_the_spec_and_keeps_tenants_apart():
    mw, front, seen = _front({"tenants": {"ka": "alice", "kb": "bob"}, "capture_unasked": False})
    st, hdrs, doc = _call(mw, "POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 2,
                                                          "dmi": {"hooks": ["blocks.1.hook_resid_post"]}}, key="ka")
    assert st == 200 and doc["dmi"]["tenant"] == "alice" and hdrs[b"x-dmi-id"].decode() == doc["dmi"]["id"]
    sent = json.loads(seen[-1]["vllm_xargs"]["dmi"])
    assert "dmi" not in seen[-1] and sent["uid"] == doc["dmi"]["id"] and sent["hooks"] == ["blocks.1.hook_resid_post"]
    # an unasked request is captured for no hook (capture_unasked false); same response id, new uid
    st, _, doc2 = _call(mw, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1}, key="kb")
    assert json.loads(seen[-1]["vllm_xargs"]["dmi"])["hooks"] == []
    assert doc2["dmi"]["id"] != doc["dmi"]["id"] and front.by_response["cmpl-same"] == [doc["dmi"]["id"],
                                                                                        doc2["dmi"]["id"]]
    # bob cannot see alice's request by uid or by the shared response id; her token can
    assert _call(mw, "DELETE", f"/v1/dmi/requests/{doc['dmi']['id']}", key="kb")[0] == 404
    st, _, gone = _call(mw, "DELETE", "/v1/dmi/requests/cmpl-same", key="kb")
    assert st == 200 and gone["deleted"] == [doc2["dmi"]["id"]]
    st, _, gone = _call(mw, "DELETE", "/v1/dmi/requests/cmpl-same", token=doc["dmi"]["token"])
    assert st == 200 and gone["deleted"] == [doc["dmi"]["id"]]
    # refused before the engine sees it, naming the field; unknown keys are refused
    n = len(seen)
    st, _, err = _call(mw, "POST", "/v1/completions", {"prompt": [1], "dmi": {"hooks": ["nope"]}}, key="ka")
    assert st == 400 and err["error"]["param"] == "dmi.hooks"
    st, _, err = _call(mw, "POST", "/v1/completions", {"prompt": [1], "dmi": {}}, key="kz")
    assert st == 401
    assert len(seen) == n


def test_tenant_quota_is_429_and_frees_on_delete():
    mw, front, _ = _front({"max_tenant_bytes": 10_000})
    body = {"prompt": [1, 2, 3], "max_tokens": 1, "dmi": {"hooks": ["blocks.0.hook_resid_post"]}}  # 4 rows x 256
    docs = [_call(mw, "POST", "/v1/completions", body)[2] for _ in range(9)]
    st, _, err = _call(mw, "POST", "/v1/completions", body)
    assert st == 429 and err["error"]["param"] == "dmi"
    _call(mw, "DELETE", f"/v1/dmi/requests/{docs[0]['dmi']['id']}", token=docs[0]["dmi"]["token"])
    assert _call(mw, "POST", "/v1/completions", body)[0] == 200


def test_steering_requests_are_bounded_by_slots_and_keep_their_own_cache():
    mw, front, seen = _front({"allow_interventions": True, "intervention_slots": 1}, STEERABLE)
    body = {"prompt": [1, 2], "max_tokens": 1, "cache_salt": "mine",
            "dmi": {"interventions": [{"hook": "blocks.0.hook_resid_post", "op": "scale", "scale": 2.0}]}}
    st, _, doc = _call(mw, "POST", "/v1/completions", body)
    sent = json.loads(seen[-1]["vllm_xargs"]["dmi"])
    assert st == 200 and sent["interventions"][0]["scale"] == 2.0
    # its prefix cache is its own (no other request reuses its edited rows), the client's salt kept apart
    assert seen[-1]["cache_salt"].startswith(f"dmi-steer-{doc['dmi']['id']}-") and len(seen[-1]["cache_salt"]) <= 128
    # never a silent false: without books to read, the response says it could not read them
    assert doc["dmi"]["interventions"][0]["applied"] is None and "books" in doc["dmi"]["interventions"][0]["why"]
    # one slot: a second steering request while the first runs is 429, naming the limit
    front.entries[doc["dmi"]["id"]].done = False
    st, _, err = _call(mw, "POST", "/v1/completions", body)
    assert st == 429 and err["error"]["param"] == "dmi.interventions" and "1" in err["error"]["message"]
    assert _call(mw, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1})[0] == 200  # others still served
    front.entries[doc["dmi"]["id"]].done = True
    assert _call(mw, "POST", "/v1/completions", body)[0] == 200
    st, _, pol = _call(mw, "GET", "/v1/dmi/policy")
    assert pol["intervention_hooks"] == {"blocks.0.hook_resid_post": [64], "blocks.1.hook_resid_post": [64]}
    assert pol["intervention_slots"] == 1


def test_sglang_requests_are_named_apart_and_by_arrival():
    """A rid reused after its request ended gets a new name; one HTTP request's engine requests
    are named (prompt, choice) in SGLang's send order, prefill-only ones as the prefix."""
    from types import SimpleNamespace as NS

    from dmi.adapters.sglang import control

    def req(rid, info=None, max_new=4):
        cp = {"dmi": json.dumps(info)} if info else None
        r = NS(rid=rid, sampling_params=NS(custom_params=cp, max_new_tokens=max_new))
        control.new_request(r)
        return control.row_name(rid)

    assert req("x") == "x" and req("x") == "x#1" and req("x") == "x#2"
    assert req("HEALTH_CHECK_1") == "HEALTH_CHECK_1"
    uid = "00112233445566aa"
    info = {"uid": uid, "n": 2, "prompts": 2}
    names = [req("p0", info, 0), req("p1", info, 0)] + [req(f"s{k}", info) for k in range(4)]
    assert names == [f"{uid}.0.prefix", f"{uid}.1.prefix", f"{uid}.0.0", f"{uid}.0.1", f"{uid}.1.0", f"{uid}.1.1"]
    assert control.request_info(f"{uid}.1.1")["uid"] == uid
    one = {"uid": "00112233445566bb", "n": 1, "prompts": 1}
    assert req("dup", one) == "00112233445566bb.0.0"
    two = {"uid": "00112233445566cc", "n": 1, "prompts": 1}
    assert req("dup", two) == "00112233445566cc.0.0"  # the same rid again: the new request's own name


class _Committing:
    """A session as the serve channel sees it: answers flush markers (or never, when stuck)."""

    def __init__(self, answers: bool = True):
        self.closed, self.answers = False, answers

    def _wait_marker(self, kind, timeout):
        return self.answers


def _channels(run, sessions):
    from dmi.serve.engine import ServeChannel

    return [ServeChannel(s, run, rank, len(sessions), served=True) for rank, s in enumerate(sessions)]


def test_a_served_flush_waits_for_this_runs_ranks_only(tmp_path):
    """Files of an earlier run with more ranks (left by overwrite: true) are not waited for;
    each rank of this run is."""
    from dmi.serve.results import flush

    run = str(tmp_path / "run.h5")
    for stale in (f"{run}.rank1", f"{run}.rank1.dmi-flushed", f"{run}.rank3.dmi-flushed"):
        with open(stale, "w") as f:
            f.write("0")
    for sessions, ok in (([_Committing()], True),
                         ([_Committing(), _Committing(answers=False)], False),   # rank 1 never commits
                         ([_Committing(), _Committing()], True)):
        channels = _channels(run, sessions)
        try:
            assert flush(run, timeout=10.0 if ok else 1.0) is ok
        finally:
            for c in channels:
                c.stop()


def test_a_session_a_script_drives_still_answers_a_served_flush(tmp_path):
    """Its serve thread polls slowly (its own flushes go through the engine's RPC), yet a
    served flush of its file is still answered, within a poll or two; a stuck session is not
    reported flushed."""
    from dmi.serve.engine import ServeChannel
    from dmi.serve.results import flush

    run = str(tmp_path / "run.h5")
    for session, ok in ((_Committing(), True), (_Committing(answers=False), False)):
        channel = ServeChannel(session, run, served=False)
        try:
            assert channel.poll_s == ServeChannel.IDLE_POLL_S > ServeChannel.POLL_S
            t0 = time.monotonic()
            assert flush(run, timeout=5.0 if ok else 1.0) is ok
            if ok:
                assert time.monotonic() - t0 < 3 * ServeChannel.IDLE_POLL_S + 0.5
        finally:
            channel.stop()
