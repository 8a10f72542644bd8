"""dmi's front end on a served engine: an ASGI middleware on the engine's own HTTP app.

On the generate routes (/v1/completions, /v1/chat/completions; SGLang's /generate too) it
reads the request's `dmi` field (top level, or vLLM `vllm_xargs.dmi`, SGLang
`custom_params.dmi`), checks it against the policy (400 naming the field; the request never
reaches the engine), gives the request a fresh uid and capability token, and sends the
engine its spec (vLLM `vllm_xargs`, SGLang `custom_params`). The response carries headers
`X-DMI-Id` / `X-DMI-Token` and, when not streamed, a `dmi` object (ids, rows' names, inline
results when asked for).

Routes (docs/serving.md):
    GET    /v1/dmi/policy                      what clients may ask
    GET    /v1/dmi/requests/{id}               manifest: per (prompt, choice) and hook, the rows
                                               held and those dropped, with why; id: the uid or
                                               the response id the client saw
    GET    /v1/dmi/requests/{id}/rows          ?prompt=&choice=&format=safetensors|npy&hook=
    DELETE /v1/dmi/requests/{id}               forget it now
A caller reads a request with its capability token (`X-DMI-Token` header or `?token=`) or an
API key of the same tenant; anything else gets 404, as for an id that does not exist.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from . import names as ids
from . import request as rq
from . import results
from .policy import ServePolicy

log = logging.getLogger("dmi")

ANONYMOUS = "anonymous"
KINDS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/generate": "generate"}


@dataclass
class Entry:
    uid: str
    tenant: str
    token: str
    kind: str
    n: int
    prompts: int
    hooks: list[str]
    inline_hooks: list[str]
    inline_positions: object
    est_bytes: int
    interventions: list | None        # as checked (dmi/serve/steer.py); None: none asked
    created: float = field(default_factory=time.time)
    response_id: str | None = None
    done: bool = False
    status: int | None = None


class Front:
    """The front end's state: policy, served hooks, and the requests it has seen."""

    def __init__(self, engine: str, spec: dict, policy: ServePolicy, served, run_path: str | None, max_len: int):
        self.engine, self.spec, self.policy = engine, spec, policy
        self.served = served
        self.run_path = run_path
        self.max_len = max_len
        self.entries: dict[str, Entry] = {}
        self.by_response: dict[str, list[str]] = {}
        self.tenant_bytes: dict[str, int] = {}

    @classmethod
    def create(cls, engine: str, spec: dict, policy, model: str, dtype: str = "auto", max_len=None) -> "Front":
        from dmi.spec import CaptureSpec

        from . import hooks
        from .engine import run_path

        policy = ServePolicy.parse(policy)
        served = hooks.for_vllm(model, dtype, spec) if engine == "vllm" else hooks.for_sglang(model, spec)
        sink = CaptureSpec.parse(spec).sink
        if isinstance(sink, dict) and sink.get("kind") == "hdf5" and "path" in sink:
            sink = sink["path"]
        served = served.narrow(policy.hooks).steer(policy.bank_hooks(served.names))
        if policy.allow_interventions and run_path(sink) is None:
            from dmi.errors import SpecError

            raise SpecError("dmi_serve.allow_interventions", "the armed spec's sink is not a file, so a response "
                                                             "could not say what its interventions did: give a file sink")
        return cls(engine, spec, policy, served, run_path(sink), int(max_len or 1 << 20))

    # -- bookkeeping -----------------------------------------------------------------------
    def tenant_of(self, headers: dict) -> str | None:
        """The caller's tenant: its API key's; "default" without a key mapping; None for a key
        the mapping does not know."""
        if not self.policy.tenants:
            return "default"
        key = _bearer(headers)
        return self.policy.tenants.get(key) if key else None

    def expire(self) -> None:
        cutoff = time.time() - self.policy.retention_s
        for uid in [u for u, e in self.entries.items() if e.created < cutoff]:
            self.forget(uid)

    def steering(self) -> int:
        """Requests with interventions admitted and not yet ended (each holds an engine slot)."""
        return sum(1 for e in self.entries.values() if e.interventions and not e.done)

    def forget(self, uid: str) -> None:
        e = self.entries.pop(uid, None)
        if e is None:
            return
        self.tenant_bytes[e.tenant] = self.tenant_bytes.get(e.tenant, 0) - e.est_bytes
        if e.response_id is not None:
            left = [u for u in self.by_response.get(e.response_id, []) if u != uid]
            if left:
                self.by_response[e.response_id] = left
            else:
                self.by_response.pop(e.response_id, None)

    def readable(self, id_: str, headers: dict, query: dict) -> list[Entry]:
        """The requests named `id_` (a uid or a response id) this caller may read."""
        self.expire()
        uids = [id_] if id_ in self.entries else self.by_response.get(id_, [])
        token = headers.get("x-dmi-token") or (query.get("token") or [None])[0]
        tenant = self.tenant_of(headers) if self.policy.tenants else None
        out = []
        for u in uids:
            e = self.entries[u]
            if (token and hmac.compare_digest(token, e.token)) or (tenant is not None and tenant == e.tenant):
                out.append(e)
        return out


class DmiMiddleware:
    def __init__(self, app, front: Front):
        self.app = app
        self.front = front

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path.startswith("/v1/dmi/") or path == "/v1/dmi":
            return await self._route(scope, receive, send)
        kind = KINDS.get(path)
        if method == "POST" and kind is not None and (kind != "generate" or self.front.engine == "sglang"):
            return await self._generate(kind, scope, receive, send)
        return await self.app(scope, receive, send)

    # -- generate ------------------------------------------------------------------------------
    async def _generate(self, kind: str, scope, receive, send):
        f = self.front
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # not ours to judge: the engine answers it
            return await self.app(scope, _replay(raw, receive), send)
        headers = _headers(scope)
        try:
            tenant = f.tenant_of(headers)
            if tenant is None and _bearer(headers) is None and not _asks(f.engine, kind, body):
                tenant = ANONYMOUS  # no key, nothing asked (the server's own warm-up): served as before
            if tenant is None:
                raise rq.RequestError("authorization", "a request with a dmi field needs an API key this server "
                                                       "maps to a tenant" if _bearer(headers) is None else
                                      "this API key maps to no tenant of this server", 401)
            entry, info = self._admit(kind, body, tenant)
        except rq.RequestError as e:
            return await _json(send, e.status, {"error": {"message": str(e), "type": "BadRequestError",
                                                          "param": e.field, "code": e.status}})
        _inject(f.engine, kind, body, json.dumps(info))
        if entry.interventions:
            _salt(body, entry.uid)
        new = json.dumps(body).encode()
        f.entries[entry.uid] = entry
        f.tenant_bytes[tenant] = f.tenant_bytes.get(tenant, 0) + entry.est_bytes
        stream = bool(body.get("stream"))
        extra = [(b"x-dmi-id", entry.uid.encode()), (b"x-dmi-token", entry.token.encode())]
        state = {"start": None, "chunks": [], "sniffed": False}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                entry.status = msg["status"]
                if stream or msg["status"] != 200:
                    msg = {**msg, "headers": list(msg.get("headers", [])) + extra}
                    return await send(msg)
                state["start"] = msg
                return
            if msg["type"] != "http.response.body":
                return await send(msg)
            if stream or state["start"] is None:
                if not state["sniffed"]:
                    rid = _sniff_sse_id(msg.get("body", b""))
                    if rid is not None:
                        state["sniffed"] = True
                        self._bind(entry, rid)
                if not msg.get("more_body", False):
                    entry.done = True
                return await send(msg)
            state["chunks"].append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            entry.done = True
            out = b"".join(state["chunks"])
            out = await self._finish(entry, kind, out)
            start = state["start"]
            hdrs = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            hdrs += [(b"content-length", str(len(out)).encode())] + extra
            await send({**start, "headers": hdrs})
            await send({"type": "http.response.body", "body": out, "more_body": False})

        try:
            await self.app(scope, _replay(new, receive), send_wrapped)
        finally:
            entry.done = True
            if entry.status is not None and entry.status != 200:
                f.forget(entry.uid)  # the engine refused it: nothing to read, nothing to count

    def _admit(self, kind: str, body: dict, tenant: str):
        f = self.front
        given = body.pop("dmi", None)
        carrier = _carrier(f.engine, kind, body)
        if carrier is not None and "dmi" in carrier:
            if given is not None:
                raise rq.RequestError("dmi", "given twice (top level and in the engine's parameters); keep one")
            given = carrier.pop("dmi")
        spec = rq.parse(given) if given is not None else None
        checked = rq.check(spec, f.policy, f.served)
        n, prompts, lens, max_tokens = _shape(kind, body)
        rows = rq.estimate_rows(lens, max_tokens, n, f.max_len)
        est = rows * checked.row_bytes
        p = f.policy
        if p.max_request_bytes is not None and est > p.max_request_bytes:
            raise rq.RequestError("dmi.hooks", f"this request may capture up to {est} bytes ({rows} token rows x "
                                               f"{checked.row_bytes} bytes over {len(checked.hooks)} hooks); the "
                                               f"server allows {p.max_request_bytes} per request: select fewer "
                                               f"hooks or tokens, or lower max_tokens")
        f.expire()
        if p.max_tenant_bytes is not None and f.tenant_bytes.get(tenant, 0) + est > p.max_tenant_bytes:
            raise rq.RequestError("dmi", f"tenant {tenant!r} holds {f.tenant_bytes.get(tenant, 0)} bytes of "
                                         f"results; this request may add {est}, over the server's "
                                         f"{p.max_tenant_bytes} per tenant: DELETE /v1/dmi/requests/<id> of "
                                         f"finished ones, or wait for retention", 429)
        inline_pos = "last"
        if spec is not None and spec.inline is not None:
            inline_pos = spec.inline.positions
            if inline_pos == "all" and rows * f.served.bytes_of(checked.inline_hooks) > p.inline_max_bytes:
                raise rq.RequestError("dmi.inline", f"all rows of this request may take "
                                                    f"{rows * f.served.bytes_of(checked.inline_hooks)} bytes, over "
                                                    f"the server's inline limit {p.inline_max_bytes}; ask for "
                                                    f"positions 'last' or a list, or fetch /v1/dmi/requests/<id>/rows")
        if checked.interventions and f.steering() >= p.intervention_slots:
            raise rq.RequestError("dmi.interventions", f"the server steers at most {p.intervention_slots} requests at "
                                                       f"once (operator policy intervention_slots), and that many "
                                                       f"are running; retry when one ends", 429)
        if checked.inline_hooks and f.run_path is None:
            raise rq.RequestError("dmi.inline", "this server's sink is not a file; results cannot be read back")
        uid = ids.new_uid()
        entry = Entry(uid, tenant, secrets.token_urlsafe(24), kind, n, prompts, checked.hooks, checked.inline_hooks,
                      inline_pos, est, checked.interventions)
        return entry, checked.engine_info(uid, tenant, kind, n, prompts)

    def _bind(self, entry: Entry, response_id: str) -> None:
        if entry.response_id is None:
            entry.response_id = response_id
        self.front.by_response.setdefault(response_id, []).append(entry.uid)

    async def _finish(self, entry: Entry, kind: str, out: bytes) -> bytes:
        """Add the `dmi` object (and inline results) to a JSON response."""
        try:
            doc = json.loads(out)
        except ValueError:
            return out
        items = doc if isinstance(doc, list) else [doc]  # SGLang's /generate answers a batch with a list
        for item in items:
            rid = (item.get("id") or (item.get("meta_info") or {}).get("id")) if isinstance(item, dict) else None
            if rid is not None and entry.uid not in self.front.by_response.get(str(rid), []):
                self._bind(entry, str(rid))
        info = {"id": entry.uid, "token": entry.token, "tenant": entry.tenant, "response_id": entry.response_id,
                "url": f"/v1/dmi/requests/{entry.uid}", "hooks": entry.hooks}
        if entry.interventions:
            try:
                info["interventions"] = await self._steered(entry)
            except Exception as e:  # the engine applied what it applied; say that it could not be read back
                log.error("dmi: interventions report of %s failed: %s", entry.uid, e)
                info["interventions"] = [{"index": k, "hook": iv["hook"], "op": iv["op"], "applied": None,
                                          "why": f"the run's books could not be read: {type(e).__name__}: {e}; "
                                                 f"see {info['url']}"} for k, iv in enumerate(entry.interventions)]
        if entry.inline_hooks:
            try:
                parts = await self._read(entry)
                size = results.inline_bytes(parts, entry.inline_hooks, entry.inline_positions)
                if size > self.front.policy.inline_max_bytes:
                    info["inline_error"] = (f"{size} bytes, over the server's inline limit "
                                            f"{self.front.policy.inline_max_bytes}; fetch {info['url']}/rows")
                else:
                    info["inline"] = results.inline(parts, entry.inline_hooks, entry.inline_positions)
            except Exception as e:  # the response itself succeeded: say why its inline part did not
                log.error("dmi: inline results of %s failed: %s", entry.uid, e)
                info["inline_error"] = f"{type(e).__name__}: {e}"
        if isinstance(doc, dict):
            doc["dmi"] = info
        else:
            for d in doc:
                if isinstance(d, dict):
                    d["dmi"] = info
        return json.dumps(doc).encode()

    async def _read(self, entry: Entry):
        f = self.front
        ok = await asyncio.to_thread(results.flush, f.run_path, f.policy.flush_timeout_s)
        if not ok:
            raise TimeoutError(f"the engine did not commit this request's rows within {f.policy.flush_timeout_s} s")
        return await asyncio.to_thread(results.read, f.run_path, entry.uid, entry.hooks)

    async def _steered(self, entry: Entry) -> list[dict]:
        """What the engine applied of the request's interventions, from the committed books."""
        from . import steer

        f = self.front
        if f.run_path is None:
            raise RuntimeError("this server's sink is not a file")
        ok = await asyncio.to_thread(results.flush, f.run_path, f.policy.flush_timeout_s)
        if not ok:
            raise TimeoutError(f"the engine did not commit within {f.policy.flush_timeout_s} s")

        def books():
            with results.open_run(f.run_path) as run:
                return run.interventions

        return steer.report(await asyncio.to_thread(books), entry.uid, entry.interventions)

    # -- /v1/dmi -------------------------------------------------------------------------------
    async def _route(self, scope, receive, send):
        f = self.front
        parts = scope["path"].rstrip("/").split("/")[3:]  # after /v1/dmi
        method = scope["method"]
        headers = _headers(scope)
        query = parse_qs(scope.get("query_string", b"").decode())
        if parts == ["policy"] and method == "GET":
            p = f.policy
            return await _json(send, 200, {"hooks": f.served.allowed, "max_request_bytes": p.max_request_bytes,
                                           "max_tenant_bytes": p.max_tenant_bytes,
                                           "allow_interventions": p.allow_interventions,
                                           "intervention_hooks": {h: list(f.served.shapes[h])
                                                                  for h in f.served.steerable},
                                           "intervention_slots": p.intervention_slots,
                                           "retention_s": p.retention_s, "capture_unasked": p.capture_unasked,
                                           "inline_max_bytes": p.inline_max_bytes,
                                           "tenants": bool(p.tenants)})
        if len(parts) < 2 or parts[0] != "requests" or len(parts) > 3:
            return await _json(send, 404, {"error": {"message": f"no dmi route {scope['path']}", "code": 404}})
        found = f.readable(parts[1], headers, query)
        if not found:
            return await _json(send, 404, {"error": {"message": f"no request {parts[1]!r} readable with these "
                                                                f"credentials (a capability token or an API key of "
                                                                f"its tenant); expired after "
                                                                f"{f.policy.retention_s:.0f} s", "code": 404}})
        if method == "DELETE" and len(parts) == 2:
            for e in found:
                f.forget(e.uid)
            return await _json(send, 200, {"deleted": [e.uid for e in found]})
        if method != "GET":
            return await _json(send, 405, {"error": {"message": "GET or DELETE", "code": 405}})
        if f.run_path is None:
            return await _json(send, 501, {"error": {"message": "this server's sink is not a file", "code": 501}})
        if len(parts) == 2:
            out = []
            for e in found:
                try:
                    got = await self._read(e)
                except TimeoutError as err:
                    return await _json(send, 504, {"error": {"message": str(err), "code": 504}})
                out.append({"id": e.uid, "response_id": e.response_id, "kind": e.kind, "n": e.n,
                            "prompts": e.prompts, "hooks": e.hooks, "finished": e.done,
                            "complete": e.done and all(p.complete for p in got) and bool(got),
                            "parts": [p.describe() for p in got]})
                if e.interventions:
                    try:
                        out[-1]["interventions"] = await self._steered(e)
                    except Exception as err:
                        out[-1]["interventions_error"] = f"{type(err).__name__}: {err}"
            return await _json(send, 200, {"requests": out})
        if parts[2] != "rows":
            return await _json(send, 404, {"error": {"message": f"no dmi route {scope['path']}", "code": 404}})
        if len(found) > 1:
            return await _json(send, 409, {"error": {"message": f"{parts[1]!r} names {len(found)} requests; "
                                                                f"fetch by uid: {[e.uid for e in found]}",
                                                     "code": 409}})
        return await self._rows(found[0], query, send)

    async def _rows(self, e: Entry, query: dict, send):
        def one(key, default=None):
            return (query.get(key) or [default])[0]

        fmt = one("format", "safetensors")
        try:
            prompt, choice = int(one("prompt", "0")), one("choice", "0")
            choice = int(choice) if choice.isdigit() else choice
        except ValueError:
            return await _json(send, 400, {"error": {"message": "prompt and choice are integers", "param": "prompt",
                                                     "code": 400}})
        if fmt not in ("safetensors", "npy"):
            return await _json(send, 400, {"error": {"message": f"format {fmt!r}; valid: safetensors, npy",
                                                     "param": "format", "code": 400}})
        try:
            got = await self._read(e)
        except TimeoutError as err:
            return await _json(send, 504, {"error": {"message": str(err), "code": 504}})
        part = next((p for p in got if p.prompt == prompt and p.choice == choice), None)
        if part is None:
            return await _json(send, 404, {"error": {"message": f"no rows for prompt {prompt} choice {choice}; "
                                                                f"held: {[(p.prompt, p.choice) for p in got]}",
                                                     "param": "choice", "code": 404}})
        hdrs = [(b"x-dmi-complete", b"true" if part.complete and e.done else b"false"),
                (b"x-dmi-part", json.dumps(part.describe()).encode())]
        if fmt == "npy":
            hook = one("hook")
            if hook not in part.hooks:
                return await _json(send, 400, {"error": {"message": f"npy holds one hook: give hook=, one of "
                                                                    f"{list(part.hooks)}", "param": "hook",
                                                         "code": 400}})
            chunks = results.npy_stream(part.hooks[hook].rows)
            ctype = b"application/x-npy"
        else:
            chunks = results.safetensors_stream(part)
            ctype = b"application/octet-stream"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)] + hdrs})
        for c in chunks:
            await send({"type": "http.response.body", "body": c, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- helpers ------------------------------------------------------------------------------------

def _headers(scope) -> dict:
    return {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}


def _bearer(headers: dict) -> str | None:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the client's disconnect, when it comes

    return replay


async def _json(send, status: int, doc) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _carrier(engine: str, kind: str, body: dict) -> dict | None:
    """Where the engine takes per-request parameters in this body (created when missing)."""
    if engine == "vllm":
        xa = body.get("vllm_xargs")
        return xa if isinstance(xa, dict) else None
    if kind == "generate":
        sp = body.get("sampling_params")
        sp = sp[0] if isinstance(sp, list) and sp else sp
        cp = sp.get("custom_params") if isinstance(sp, dict) else None
        return cp if isinstance(cp, dict) else None
    cp = body.get("custom_params")
    return cp if isinstance(cp, dict) else None


def _asks(engine: str, kind: str, body: dict) -> bool:
    carrier = _carrier(engine, kind, body)
    return "dmi" in body or (carrier is not None and "dmi" in carrier)


def _inject(engine: str, kind: str, body: dict, info: str) -> None:
    if engine == "vllm":
        body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), "dmi": info}
    elif kind == "generate":
        sp = body.get("sampling_params")
        for d in (sp if isinstance(sp, list) else [sp if isinstance(sp, dict) else body.setdefault("sampling_params",
                                                                                                     {})]):
            d["custom_params"] = {**(d.get("custom_params") or {}), "dmi": info}
    else:
        body["custom_params"] = {**(body.get("custom_params") or {}), "dmi": info}


def _salt(body: dict, uid: str) -> None:
    """A steered request's KV cache is its own: no other request reuses its edited prefix, and
    it reuses no unedited one (both engines key their prefix caches by cache_salt)."""
    import hashlib

    own = body.get("cache_salt")
    tag = hashlib.sha256(own.encode()).hexdigest()[:16] if isinstance(own, str) and own else ""
    body["cache_salt"] = f"dmi-steer-{uid}" + (f"-{tag}" if tag else "")


def _shape(kind: str, body: dict) -> tuple[int, int, list[int | None], int | None]:
    """(n, prompts, each prompt's length or None, max new tokens) of a generate body."""
    if kind == "generate":
        sp = body.get("sampling_params") or {}
        sp = sp[0] if isinstance(sp, list) and sp else sp
        n = int(sp.get("n", 1) or 1) if isinstance(sp, dict) else 1
        max_tokens = sp.get("max_new_tokens") if isinstance(sp, dict) else None
        prompt = body.get("input_ids", body.get("text"))
    else:
        n = int(body.get("n", 1) or 1)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        prompt = body.get("prompt") if kind == "completions" else None
    if kind == "chat" or prompt is None:
        lens: list[int | None] = [None]
    elif isinstance(prompt, str):
        lens = [None]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        lens = [len(prompt)]
    elif isinstance(prompt, list):
        lens = [len(p) if isinstance(p, list) else None for p in prompt] or [None]
    else:
        lens = [None]
    return n, len(lens), lens, int(max_tokens) if isinstance(max_tokens, int) else None


def _sniff_sse_id(chunk: bytes) -> str | None:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {"):
            try:
                doc = json.loads(line[6:])
            except ValueError:
                continue
            rid = doc.get("id") or (doc.get("meta_info") or {}).get("id")
            if rid is not None:
                return str(rid)
    return None
