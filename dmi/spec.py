"""CaptureSpec: what to capture, from which rows, into how big a ring, written where.

It is stored as JSON in every output file, so it must round-trip exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmi.errors import SpecError, closest

TOKEN_MODES = ("all", "prefill", "decode", "last")
OVERLOAD_MODES = ("block", "drop", "degrade")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenFilter(_Strict):
    """Which token rows of the selected requests are kept. All conditions must hold."""

    mode: Literal["all", "prefill", "decode", "last"] = "all"
    positions: list[tuple[int, int]] | None = None  # [start, stop) ranges of token positions
    every: int = Field(1, ge=1)                     # positions p with p % every == 0

    @field_validator("positions")
    @classmethod
    def _ranges(cls, v):
        if v is not None:
            if not v:
                raise ValueError("an empty range list selects nothing; use null for all positions")
            for start, stop in v:
                if start < 0 or stop <= start:
                    raise ValueError(f"range [{start}, {stop}) is empty or negative; write [start, stop) "
                                     f"with 0 <= start < stop")
        return v

    def is_subset_of(self, other: "TokenFilter") -> bool:
        """Every row this filter keeps, `other` keeps too."""
        mode_ok = other.mode == "all" or self.mode == other.mode
        every_ok = self.every % other.every == 0
        if other.positions is None:
            pos_ok = True
        elif self.positions is None:
            pos_ok = False
        else:
            pos_ok = all(any(a <= s and e <= b for a, b in other.positions) for s, e in self.positions)
        return mode_ok and every_ok and pos_ok


class RequestFilter(_Strict):
    ids: list[str] | None = None
    sample: float = Field(1.0, ge=0.0, le=1.0)
    seed: int = 0
    predicate: str | None = None  # a request predicate registered by a plugin (dmi_request_predicates)

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


def _tokens(v):
    return {"mode": v} if isinstance(v, str) else v


class Fallback(_Strict):
    """What `degrade` keeps while the ring is above its high watermark: a subset of the spec."""

    hooks: list[str]
    tokens: TokenFilter = Field(default_factory=TokenFilter)

    _tokens = field_validator("tokens", mode="before")(classmethod(lambda cls, v: _tokens(v)))


class DegradeSpec(_Strict):
    fallback: Fallback
    high: float = Field(0.75, gt=0.0, le=1.0)  # ring fill at which capture switches to the fallback
    low: float = Field(0.25, ge=0.0, lt=1.0)   # ring fill at which it switches back

    @field_validator("low")
    @classmethod
    def _order(cls, low, info):
        high = info.data.get("high")
        if high is not None and low >= high:
            raise ValueError(f"watermarks out of order: low ({low}) must be below high ({high})")
        return low


class CaptureSpec(_Strict):
    hooks: list[str] = Field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    tokens: TokenFilter = Field(default_factory=TokenFilter)
    requests: RequestFilter = Field(default_factory=RequestFilter)
    steps: StepFilter = Field(default_factory=StepFilter)
    ring: RingSpec = Field(default_factory=RingSpec)
    overload: Literal["block", "drop", "degrade"] = "block"
    degrade: DegradeSpec | None = None
    sink: Union[str, dict[str, Any]] = "dmi_capture.h5"
    # An existing run at the sink's path is refused at attach unless this is true.
    overwrite: bool = False

    _tokens = field_validator("tokens", mode="before")(classmethod(lambda cls, v: _tokens(v)))

    @field_validator("hooks", mode="before")
    @classmethod
    def _hooks_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if not v:
            raise ValueError("no hooks selected; give names, globs or a preset such as 'resid'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _overwrite_reaches_the_sink(cls, data):
        """Sink plugins see only the `sink` value, so overwrite: true travels inside it (for the
        built-in file sinks; a path becomes {"kind": "hdf5", "path": ..., "overwrite": true})."""
        if not (isinstance(data, dict) and data.get("overwrite") is True):
            return data
        sink = data.get("sink", cls.model_fields["sink"].default)
        if isinstance(sink, str) and sink != "memory":
            sink = {"kind": "hdf5", "path": sink, "overwrite": True}
        elif isinstance(sink, dict) and sink.get("kind") in ("hdf5", "dataset"):
            sink = {**sink, "overwrite": True}
        return {**data, "sink": sink}

    @model_validator(mode="after")
    def _degrade_declared(self):
        if self.overload == "degrade" and self.degrade is None:
            raise ValueError("overload 'degrade' needs a declared fallback: degrade={'fallback': {'hooks': [...], "
                             "'tokens': ...}, 'high': 0.75, 'low': 0.25}")
        if self.degrade is not None and self.overload != "degrade":
            raise ValueError(f"a degrade fallback is declared but overload is {self.overload!r}; set overload='degrade'")
        return self

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
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int)) or "spec"
    if err["type"] == "value_error" and not err["loc"] and "degrade" in err["msg"]:
        loc = "overload"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        parent = CaptureSpec
        for part in err["loc"][:-1]:
            ann = parent.model_fields[part].annotation
            parent = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)),
                          ann)
        fields = list(parent.model_fields)
        msg = f"unknown field; valid fields: {', '.join(fields)} (did you mean {closest(str(err['loc'][-1]), fields, 1)[0]!r}?)"
    return SpecError(loc, msg)
