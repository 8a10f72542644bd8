"""One request's `dmi` field: parsed, checked against the operator's policy, and turned into
what the engine side receives (dmi/serve/engine.py).

    "dmi": {
      "hooks": ["blocks.*.hook_resid_post"],      # within the policy's hooks; default: all of them
      "tokens": "last" | {"mode": ..., "positions": [[a, b]], "every": k},   # default: all rows
      "inline": true | {"hooks": [...], "positions": "last" | "all" | [p, ...]},
      "interventions": [...]                      # only where the policy allows them (steer.py)
    }

Anything malformed or outside the policy raises RequestError: HTTP 400 (429 for a tenant
over its quota) with the field named (`dmi.hooks`, ...). Clients never name a path, a sink or
a plugin: such fields are unknown fields.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dmi.errors import SpecError
from dmi.spec import TokenFilter


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 400):
        self.field, self.status = field, status
        super().__init__(f"{field}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Inline(_Strict):
    hooks: list[str] | None = None
    positions: Union[Literal["last", "all"], list[int]] = "last"


class RequestSpec(_Strict):
    hooks: list[str] | None = None
    tokens: TokenFilter | None = None
    inline: Inline | None = None       # true: Inline(); false: None
    interventions: list[dict[str, Any]] | None = None

    @field_validator("inline", mode="before")
    @classmethod
    def _flag(cls, v):
        if v is True:
            return {}
        return None if v is False else v

    @field_validator("tokens", mode="before")
    @classmethod
    def _mode(cls, v):
        return {"mode": v} if isinstance(v, str) else v

    @field_validator("hooks", mode="before")
    @classmethod
    def _one(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and not v:
            raise ValueError("an empty hook list selects nothing; leave the field out for the policy's hooks")
        return v


def parse(obj: Any) -> RequestSpec:
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError as e:
            raise RequestError("dmi", f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError("dmi", f"expected an object of fields (hooks, tokens, inline, interventions), "
                                  f"got {type(obj).__name__}")
    try:
        return RequestSpec.model_validate(obj)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        fields = []
        for x in err["loc"]:  # field names, up to pydantic's union-branch labels ("literal[...]")
            if isinstance(x, int):
                continue
            if not re.match(r"^[A-Za-z_]\w*$", str(x)) or x in ("bool", "str", "int", "list", "dict"):
                break
            fields.append(str(x))
        loc = ".".join(fields)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = {"inline": Inline, "tokens": TokenFilter}.get(str(err["loc"][0]), RequestSpec) \
                if len(err["loc"]) > 1 else RequestSpec
            msg = f"unknown field; valid fields: {', '.join(parent.model_fields)}"
        raise RequestError(f"dmi.{loc}" if loc else "dmi", msg) from None


class Checked:
    """A request's spec after the policy: what the engine gets, and what it may cost."""

    def __init__(self, spec: RequestSpec | None, hooks: list[str], row_bytes: int, inline_hooks: list[str],
                 interventions: list[dict] | None = None):
        self.spec = spec
        self.interventions = interventions  # checked (dmi/serve/steer.py); the engine applies them
        self.hooks = hooks              # canonical names the request's rows are captured for
        self.row_bytes = row_bytes      # bytes of one token row over those hooks
        self.inline_hooks = inline_hooks

    def engine_info(self, uid: str, tenant: str, kind: str, n: int, prompts: int) -> dict:
        s = self.spec
        return {"uid": uid, "tenant": tenant, "kind": kind, "n": n, "prompts": prompts, "hooks": self.hooks,
                "tokens": s.tokens.model_dump() if s is not None and s.tokens is not None else None,
                "interventions": self.interventions}


def check(spec: RequestSpec | None, policy, served) -> Checked:
    """`served`: dmi.serve.hooks.Served (the hooks the server captures, with their row sizes)."""
    if spec is None:
        hooks = list(served.allowed) if policy.capture_unasked else []
        return Checked(None, hooks, served.bytes_of(hooks), [])
    if spec.hooks is None:
        hooks = list(served.allowed)
    else:
        try:
            hooks = served.resolve(spec.hooks)
        except SpecError as e:
            raise RequestError("dmi.hooks", str(e).split(": ", 1)[-1]) from None
    inline_hooks: list[str] = []
    if spec.inline is not None:
        inline = spec.inline
        if inline.hooks is None:
            inline_hooks = hooks
        else:
            try:
                inline_hooks = served.resolve(inline.hooks)
            except SpecError as e:
                raise RequestError("dmi.inline.hooks", str(e).split(": ", 1)[-1]) from None
            outside = [h for h in inline_hooks if h not in hooks]
            if outside:
                raise RequestError("dmi.inline.hooks", f"{outside[0]!r} is not among the request's hooks")
    interventions = None
    if spec.interventions is not None:
        if not policy.allow_interventions:
            raise RequestError("dmi.interventions", "this server does not allow clients to intervene "
                                                    "(operator policy allow_interventions is false)")
        from . import steer

        interventions = steer.check(spec.interventions, served)
    return Checked(spec, hooks, served.bytes_of(hooks), inline_hooks, interventions)


def estimate_rows(prompt_lens: list[int | None], max_tokens: int | None, n: int, max_len: int) -> int:
    """Upper bound on the token rows a request computes: each prompt's positions (max_len
    where unknown) plus max_tokens, for each of its n choices."""
    total = 0
    for p in prompt_lens:
        p = max_len if p is None else p
        total += n * min(p + (max_tokens if max_tokens is not None else max_len), max_len)
    return total
