"""What the operator allows clients of a served engine, set at launch.

vLLM: `--additional-config '{"dmi": SPEC, "dmi_serve": POLICY}'`; SGLang: `DMI_SPEC=SPEC
DMI_SERVE=POLICY`. The armed SPEC says which capture points exist and where rows go (its
sink: the operator's file, never named by a client); the POLICY says what one request may
ask of them. A bad policy stops the server at start-up, naming the field.
"""
from __future__ import annotations

import json
import re
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from dmi.errors import SpecError


class ServePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Hook patterns clients may select (names, globs, presets), within the armed spec's hooks;
    # None: all of the armed spec's hooks.
    hooks: list[str] | None = None
    # Upper bound on the bytes one request's rows may take (estimated from its prompt,
    # max_tokens, n and the selected hooks' row sizes, before it runs); None: no bound.
    max_request_bytes: int | None = Field(None, gt=0)
    # Upper bound on the bytes one tenant's retained requests may take together.
    max_tenant_bytes: int | None = Field(None, gt=0)
    # Whether a request may carry `interventions` (steering); refused with 400 otherwise.
    allow_interventions: bool = False
    # Hooks clients may intervene on (patterns within the armed spec's hooks); the engine arms
    # one value bank per hook at launch. None: the armed spec's residual-stream hooks
    # (blocks.*.hook_resid_post).
    intervention_hooks: list[str] | None = None
    # How many requests with interventions the engine holds values for at once; the front end
    # admits no more than this many at a time (429 beyond).
    intervention_slots: int = Field(8, ge=1, le=4096)
    # How long a request's results stay reachable through /v1/dmi (seconds from its end).
    retention_s: float = Field(3600.0, gt=0)
    # API key -> tenant. A request's tenant is its key's; without a mapping every request is
    # tenant "default" and results are reached with the request's capability token only.
    tenants: dict[str, str] | None = None
    # Requests without a `dmi` field: captured with the armed spec (True) or not at all.
    capture_unasked: bool = True
    # Largest inline result (bytes of raw rows) a response may carry.
    inline_max_bytes: int = Field(1 << 20, ge=0)
    # How long a results read waits for the engine to commit a request's rows.
    flush_timeout_s: float = Field(30.0, gt=0)

    def bank_hooks(self, armed: list[str]) -> list[str]:
        """The hooks clients may intervene on, among the armed spec's hooks `armed` (both the
        front end and the engine compute them from those names alone, so they agree)."""
        from dmi.hooknames import PRESETS, resolve

        if not self.allow_interventions:
            return []
        patterns = self.intervention_hooks or ["blocks.*.hook_resid_post"]

        for pat in patterns:
            if pat not in PRESETS and not any(c in pat for c in "*?[") and pat not in armed:
                raise SpecError("dmi_serve.intervention_hooks", f"{pat!r} is not among the armed spec's hooks "
                                                                 f"({', '.join(armed[:4])}, ...)")
        layers = [int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", n) for n in armed) if m]
        try:
            names = resolve(patterns, armed, max(layers, default=-1) + 1)
        except SpecError as e:
            why = str(e).split(": ", 1)[-1]
            if self.intervention_hooks is None:
                why = "the armed spec captures no blocks.*.hook_resid_post; name the hooks clients may steer"
            raise SpecError("dmi_serve.intervention_hooks", f"{why} (they must be among the armed spec's hooks)") \
                from None
        bad = [n for n in names if n.startswith("module:")]
        if bad:
            raise SpecError("dmi_serve.intervention_hooks", f"{bad[0]!r}: name hooks of the armed spec, not modules")
        return names

    @classmethod
    def parse(cls, obj: Any) -> "ServePolicy":
        if obj is None:
            return cls()
        if isinstance(obj, ServePolicy):
            return obj
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except ValueError as e:
                raise SpecError("dmi_serve", f"not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise SpecError("dmi_serve", f"expected a mapping of policy fields, got {type(obj).__name__}")
        try:
            policy = cls.model_validate(obj)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown field; valid fields: {', '.join(cls.model_fields)}"
            raise SpecError(f"dmi_serve.{loc}", msg) from None
        # Across fields, so checked here, where the field to name is known.
        if not policy.allow_interventions and policy.intervention_hooks is not None:
            raise SpecError("dmi_serve.intervention_hooks", "set but allow_interventions is false; set both, or neither")
        if policy.intervention_hooks is not None and not policy.intervention_hooks:
            raise SpecError("dmi_serve.intervention_hooks", "an empty list allows nothing; set allow_interventions "
                                                            "false instead")
        return policy
