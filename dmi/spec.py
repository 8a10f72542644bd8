"""CaptureSpec: what to capture, from which rows, into how big a ring, written where.

It is stored as JSON in every output file, so it must round-trip exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmi.errors import SpecError, closest

TOKEN_MODES = ("all", "prefill", "decode", "last")
OVERLOAD_MODES = ("block", "drop", "degrade")

# Counts, positions and byte sizes end up in int64 arrays (row tables, the HDF5 file).
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(le=INT64_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _listed(v, one: tuple[type, ...], empty: str):
    """A list field written as one value means a list of it; an empty list is refused (`empty`
    says what to write instead), since it would select nothing."""
    if isinstance(v, one) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, (list, tuple)) and not v:
        raise ValueError(empty)
    return v


class TokenFilter(_Strict):
    """Which token rows of the selected requests are kept. All conditions must hold.

    `last` keeps, in each engine step, the last row of each request that has rows in that step:
    the last prompt token of a prefill (or of each chunk of a chunked prefill), then every decode
    row (a decode step has one row per request). Over a whole generate call: the prompt's last
    position, then every position decoded after it."""

    mode: Literal["all", "prefill", "decode", "last"] = "all"
    positions: list[tuple[Int64, Int64]] | None = None  # [start, stop) ranges of token positions
    every: Int64 = Field(1, ge=1)                       # positions p with p % every == 0

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
        """Whether this filter, used as `other`'s degrade fallback, keeps only rows `other` keeps.

        A fallback narrows its spec: while degraded a row is kept when the spec keeps it and the
        fallback does too. So a condition the fallback leaves at its default (mode `all`, no
        `positions`, `every` 1) is the spec's, and one it sets must lie within the spec's:
        - mode: `all` and the spec's own mode always fit; `last` fits any mode (the last row of
          each request in a step, if the spec keeps it); `prefill` and `decode` fit `all` or
          `last` but exclude each other;
        - positions: each fallback range inside one of the spec's ranges;
        - every: a multiple of the spec's.
        """
        return self.why_not_within(other) is None

    def why_not_within(self, other: "TokenFilter") -> str | None:
        """None when `is_subset_of(other)`, else which condition reaches outside `other`."""
        if {self.mode, other.mode} == {"prefill", "decode"}:
            return f"mode {self.mode!r} keeps no row of the spec's mode {other.mode!r}"
        if self.every != 1 and self.every % other.every:
            return f"every {self.every} is not a multiple of the spec's every {other.every}"
        if self.positions is not None and other.positions is not None:
            outside = [(s, e) for s, e in self.positions
                       if not any(a <= s and e <= b for a, b in other.positions)]
            if outside:
                s, e = outside[0]
                return f"positions [{s}, {e}) are not within the spec's ranges {[list(r) for r in other.positions]}"
        return None


class RequestFilter(_Strict):
    ids: list[str] | None = None  # request ids are strings; integers are taken as their decimal form
    sample: float = Field(1.0, ge=0.0, le=1.0)
    seed: Int64 = 0
    predicate: str | None = None  # a request predicate registered by a plugin (dmi_request_predicates)

    @field_validator("ids", mode="before")
    @classmethod
    def _ids(cls, v):
        if v is None:
            return v
        if not isinstance(v, (str, int, list, tuple)) or isinstance(v, bool):
            raise ValueError(f"expected a list of request ids, got {type(v).__name__}")
        v = _listed(v, (str, int), "an empty id list selects nothing; use null for all requests")
        out = []
        for x in v:
            # HF ids are "0", "1", ...: an unquoted 0 in a YAML file means that request.
            if isinstance(x, int) and not isinstance(x, bool):
                x = str(x)
            if not isinstance(x, str):
                raise ValueError(f"request ids are strings (integers are converted), got {x!r}")
            out.append(x)
        return out


class StepFilter(_Strict):
    stride: Int64 = Field(1, ge=1)
    warmup: Int64 = Field(0, ge=0)


class RingSpec(_Strict):
    bytes: Int64 = Field(256 * 2**20, gt=0)  # checked against the device's free memory at attach


class DrainSpec(_Strict):
    """When the drain thread moves sealed steps from the ring to the sink (dmi/ring/frames.py)."""

    # stream: every 0.1 s while steps arrive (up to 1 s while under 2 MiB came); pause: once
    # the engine pauses (the end of a generate, a server between batches), the ring is half
    # full, or the oldest step waited
    # max_delay_s (docs/decisions.md, "Drain schedule": on this project's 2-core CPU machine
    # neither was faster beyond the noise, so the default stays the one measured longest).
    schedule: Literal["stream", "pause"] = "stream"
    max_delay_s: float = Field(5.0, gt=0.0)


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


from dmi.interventions.spec import Intervention, resolve_forward_refs  # noqa: E402  (needs the filters above)

resolve_forward_refs()


class CaptureSpec(_Strict):
    hooks: list[str] = Field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    tokens: TokenFilter = Field(default_factory=TokenFilter)
    requests: RequestFilter = Field(default_factory=RequestFilter)
    steps: StepFilter = Field(default_factory=StepFilter)
    ring: RingSpec = Field(default_factory=RingSpec)
    drain: DrainSpec = Field(default_factory=DrainSpec)
    overload: Literal["block", "drop", "degrade"] = "block"
    degrade: DegradeSpec | None = None
    sink: Union[str, dict[str, Any]] = "dmi_capture.h5"
    # An existing run at the sink's path is refused at attach unless this is true.
    overwrite: bool = False
    # Edits of activations, per request and token (dmi.interventions); [] captures only.
    interventions: list[Intervention] = Field(default_factory=list)

    _tokens = field_validator("tokens", mode="before")(classmethod(lambda cls, v: _tokens(v)))

    @field_validator("ring", mode="before")
    @classmethod
    def _ring_bytes(cls, v):
        # `ring: 67108864` is read as the ring's size in bytes.
        if isinstance(v, int) and not isinstance(v, bool):
            return {"bytes": v}
        if not isinstance(v, (dict, RingSpec)):
            raise ValueError(f"expected the ring's size in bytes (an integer) or {{'bytes': n}}, got {v!r}")
        return v

    @field_validator("sink", mode="before")
    @classmethod
    def _sink_given(cls, v):
        if v is None:
            raise ValueError("no sink given; write an output file path such as 'out.h5', "
                             "or {'kind': ..., ...} for a plugin's sink")
        if not isinstance(v, (str, dict)):
            raise ValueError(f"expected an output file path (str) or {{'kind': ..., ...}}, got {type(v).__name__}")
        return v

    @field_validator("hooks", mode="before")
    @classmethod
    def _hooks_list(cls, v):
        if v is None or v is False or v == "":
            v = []
        # a single name means a list of it; [] is refused below unless the spec only intervenes
        return _listed(v, (str,), "") if v else v

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
    def _something_to_do(self):
        if not self.hooks and not self.interventions:
            raise ValueError("no hooks selected; give names, globs or a preset such as 'resid' "
                             "(an empty list only with interventions)")
        return self

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
                obj = json.loads(obj, object_pairs_hook=_unique_keys)
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
                data = _load_yaml(text)
            else:
                data = json.loads(text, object_pairs_hook=_unique_keys)
        except SpecError as e:
            raise SpecError(e.field, f"{e.args[0].split(': ', 1)[1]} (in {str(p)!r})") from None
        except Exception as e:  # the parsers' own messages carry line and column
            raise SpecError("spec", f"malformed spec file {str(p)!r}: {e}") from None
        if not isinstance(data, dict):
            raise SpecError("spec", f"spec file {str(p)!r} must hold a mapping of fields, got {type(data).__name__}")
        return cls.parse(data)

    def to_json(self) -> str:
        return self.model_dump_json()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is a mistake (the parser would keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _given_twice(key)
        out[key] = value
    return out


def _given_twice(key: Any, line: int | None = None) -> SpecError:
    """JSON and YAML parsers keep the last of a key given twice; dmi refuses it, the same way for both."""
    where = f" (line {line})" if line is not None else ""
    return SpecError(str(key), f"given twice in the spec{where}; keep one")


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a mapping that gives one key twice (safe_load keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges defaults that the mapping's own keys override
            key = loader.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                break
            if dup:
                raise _given_twice(key, key_node.start_mark.line + 1)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueKeyLoader)


def _intervention_loc(loc: tuple) -> str:
    """interventions[2].value: the entry's index, then its field (not pydantic's union member names)."""
    out = "interventions"
    for x in loc[1:]:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x in Intervention.model_fields or x in ("requests", "tokens") or out.endswith(("requests", "tokens")):
            out += f".{x}"
        else:
            break
    return out


def _as_spec_error(e: pydantic.ValidationError) -> SpecError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int)) or "spec"
    if err["loc"][:1] == ("interventions",):
        loc = _intervention_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            loc += f".{err['loc'][-1]}"
    if err["type"] == "value_error" and not err["loc"] and "degrade" in err["msg"]:
        loc = "overload"
    if err["type"] == "value_error" and not err["loc"] and "no hooks selected" in err["msg"]:
        loc = "hooks"
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
    if err["type"] == "extra_forbidden":
        parent = CaptureSpec
        for part in err["loc"][:-1]:
            if isinstance(part, int) or part not in parent.model_fields:
                continue  # a list index, or a union member's name (interventions[i].value)
            ann = parent.model_fields[part].annotation
            ann = getattr(ann, "__args__", (ann,))[0] if getattr(ann, "__origin__", None) is list else ann
            parent = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)),
                          ann)
        fields = list(parent.model_fields)
        msg = f"unknown field; valid fields: {', '.join(fields)} (did you mean {closest(str(err['loc'][-1]), fields, 1)[0]!r}?)"
    return SpecError(loc, msg)
