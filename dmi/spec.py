"""CaptureSpec: what to capture, from which rows, into how big a ring, written where.

It is stored as JSON in every output file, so it must round-trip exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dmi.errors import SpecError, closest

TOKEN_MODES = ("all", "prefill", "decode", "last")
OVERLOAD_MODES = ("block", "drop", "degrade")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RequestFilter(_Strict):
    ids: list[str] | None = None
    sample: float = Field(1.0, ge=0.0, le=1.0)
    seed: int = 0

    @field_validator("ids")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("an empty id list selects nothing; use null for all requests")
        return [str(x) for x in v] if v is not None else v


class StepFilter(_Strict):
    stride: int = Field(1, ge=1)
    warmup: int = Field(0, ge=0)


class RingSpec(_Strict):
    bytes: int = Field(256 * 2**20, gt=0)


class CaptureSpec(_Strict):
    hooks: list[str] = Field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    tokens: Literal["all", "prefill", "decode", "last"] = "all"
    requests: RequestFilter = Field(default_factory=RequestFilter)
    steps: StepFilter = Field(default_factory=StepFilter)
    ring: RingSpec = Field(default_factory=RingSpec)
    overload: Literal["block", "drop", "degrade"] = "block"
    sink: Union[str, dict[str, Any]] = "dmi_capture.h5"

    @field_validator("hooks", mode="before")
    @classmethod
    def _hooks_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if not v:
            raise ValueError("no hooks selected; give names, globs or a preset such as 'resid'")
        return v

    @field_validator("overload")
    @classmethod
    def _overload_available(cls, v):
        if v == "degrade":
            # Needs a declared fallback spec and watermarks; not in this version yet.
            raise ValueError("'degrade' is not available in this version; use 'block' (lossless) or 'drop' (counted)")
        return v

    # -- construction from user input -------------------------------------------------
    @classmethod
    def parse(cls, obj: Any) -> "CaptureSpec":
        """Accepts a CaptureSpec, a dict, a JSON string, or a path to a .json/.yaml file."""
        if obj is None:
            return cls()
        if isinstance(obj, CaptureSpec):
            return obj
        if isinstance(obj, (str, Path)) and Path(obj).suffix in (".json", ".yaml", ".yml"):
            return cls.from_file(obj)
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise SpecError("spec", f"not a spec file path and not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise SpecError("spec", f"expected a CaptureSpec, dict, JSON string or file path, got {type(obj).__name__}")
        try:
            return cls.model_validate(obj)
        except pydantic.ValidationError as e:
            raise _as_spec_error(e) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "CaptureSpec":
        p = Path(path)
        if not p.is_file():
            raise SpecError("spec", f"spec file {str(p)!r} does not exist")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # the parsers' own messages carry line and column
            raise SpecError("spec", f"malformed spec file {str(p)!r}: {e}") from None
        if not isinstance(data, dict):
            raise SpecError("spec", f"spec file {str(p)!r} must hold a mapping of fields, got {type(data).__name__}")
        return cls.parse(data)

    def to_json(self) -> str:
        return self.model_dump_json()


def _as_spec_error(e: pydantic.ValidationError) -> SpecError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "spec"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        parent = CaptureSpec
        for part in err["loc"][:-1]:
            parent = parent.model_fields[part].annotation
        fields = list(parent.model_fields)
        msg = f"unknown field; valid fields: {', '.join(fields)} (did you mean {closest(str(err['loc'][-1]), fields, 1)[0]!r}?)"
    return SpecError(loc, msg)
