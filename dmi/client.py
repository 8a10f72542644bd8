"""A client of a dmi-armed server (vLLM or SGLang): requests with a `dmi` field, and their
results, inline or fetched from `/v1/dmi/...` by the id the response carries.

    from dmi.client import Client
    c = Client("http://127.0.0.1:8000", api_key="key-a")
    r = c.completions(model=m, prompt=[1, 2, 3], max_tokens=4, dmi={"hooks": ["blocks.0.hook_resid_post"]})
    rows = c.rows(r)                      # {hook: tensor [rows, ...], hook + ".positions": ...}
    first = c.manifest(r)                 # what is held and what was dropped, with why
    Client.inline(r)                      # decoded inline results, when the request asked for them

Only the standard library, numpy and torch; the `openai` package works too (pass `dmi` in
`extra_body`, read `response.model_extra["dmi"]`).
"""
from __future__ import annotations

import base64
import json
import struct
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch

_ST = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
       "BOOL": torch.bool}


class DmiHTTPError(RuntimeError):
    def __init__(self, status: int, doc):
        self.status = status
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        self.field = err.get("param")
        self.doc = doc
        super().__init__(f"HTTP {status}: {err.get('message', doc)}")


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    # -- requests ---------------------------------------------------------------------------
    def completions(self, **body) -> dict:
        return self._json("POST", "/v1/completions", body)

    def chat(self, **body) -> dict:
        return self._json("POST", "/v1/chat/completions", body)

    def generate(self, **body) -> dict:
        """SGLang's native /generate."""
        return self._json("POST", "/generate", body)

    # -- results ----------------------------------------------------------------------------
    def manifest(self, response, token: str | None = None) -> dict:
        """Per (prompt, choice) and hook: rows held, rows dropped and why, complete or not."""
        id_, token = _id(response, token)
        return self._json("GET", f"/v1/dmi/requests/{urllib.parse.quote(id_)}", None, token=token)

    def rows(self, response, prompt: int = 0, choice: int | str = 0, token: str | None = None) -> dict:
        """{hook: rows [n, ...], hook + ".positions": int64 [n]} of one (prompt, choice), as
        safetensors from the server; "__dmi__" holds its manifest entry."""
        id_, token = _id(response, token)
        q = urllib.parse.urlencode({"prompt": prompt, "choice": choice, "format": "safetensors"})
        data, headers = self._get(f"/v1/dmi/requests/{urllib.parse.quote(id_)}/rows?{q}", token)
        out = parse_safetensors(data)
        out["__dmi__"] = json.loads(headers.get("x-dmi-part", "{}"))
        return out

    def forget(self, response, token: str | None = None) -> dict:
        id_, token = _id(response, token)
        return self._json("DELETE", f"/v1/dmi/requests/{urllib.parse.quote(id_)}", None, token=token)

    @staticmethod
    def inline(response) -> list[dict]:
        """The response's inline results, decoded: per (prompt, choice), {hook: (rows, positions)}."""
        out = []
        for part in (response.get("dmi") or {}).get("inline", []):
            out.append({**part, "hooks": {k: (decode_inline(v), v["positions"]) for k, v in part["hooks"].items()}})
        return out

    # -- plumbing ---------------------------------------------------------------------------
    def _req(self, method: str, path: str, body, token: str | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if token:
            headers["X-DMI-Token"] = token
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(self.base + path, data=data, headers=headers, method=method)

    def _json(self, method: str, path: str, body, token: str | None = None):
        data, _ = self._send(self._req(method, path, body, token))
        return json.loads(data)

    def _get(self, path: str, token: str | None):
        return self._send(self._req("GET", path, None, token))

    def _send(self, req):
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = raw.decode(errors="replace")
            raise DmiHTTPError(e.code, doc) from None


def _id(response, token):
    if isinstance(response, dict):
        d = response.get("dmi") or {}
        return d.get("id") or response.get("id"), token or d.get("token")
    return str(response), token


def decode_inline(v: dict) -> torch.Tensor:
    """One hook's inline encoding -> a tensor (dtype and shape as the encoding says)."""
    raw = base64.b64decode(v["data"])
    if v["dtype"] == "bfloat16":
        return torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16).reshape(v["shape"])
    return torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(v["dtype"]).newbyteorder("<")).copy()).reshape(
        v["shape"])


def parse_safetensors(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        dtype = _ST[h["dtype"]]
        buf = bytearray(data[base + a: base + b])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(h["shape"])
    return out
