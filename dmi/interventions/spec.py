"""The `interventions` spec field: which hook, which operation, which value, which rows."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OPS = ("add", "set", "scale", "zero", "project_out", "patch")
VALUE_OPS = ("add", "set", "project_out", "patch")  # ops that need a value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FileValue(_Strict):
    """A vector in a .npy, .safetensors or .pt file (`key`: the tensor's name in a
    .safetensors file or a .pt dict; optional when the file holds one tensor)."""

    file: str
    key: str | None = None


class RunValue(_Strict):
    """Rows of a stored dmi run: request `request` at hook `hook` (default: the intervention's
    hook). `patch` uses every stored position; other ops take the row at `position` (default the
    last stored one; negative counts from the end)."""

    run: str
    request: str
    hook: str | None = None
    position: int | None = None

    @field_validator("request", mode="before")
    @classmethod
    def _rid(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class Intervention(_Strict):
    hook: str                                  # a capture name (or glob: every hook it selects)
    op: Literal["add", "set", "scale", "zero", "project_out", "patch"]
    # inline numbers, a file (path string or {"file", "key"}), or a stored run's rows
    value: Union[list[float], list[list[float]], FileValue, RunValue, str, None] = None
    scale: float | None = None                 # add: value * scale; scale: the factor
    heads: list[int] | None = None             # zero: only these heads of an attention hook
    requests: "RequestFilter" = Field(default_factory=lambda: _request_filter())
    tokens: "TokenFilter" = Field(default_factory=lambda: _token_filter())
    capture: Literal["after", "before"] = "after"  # what a capture at this hook records
    name: str | None = None                    # its name in the books (default "<index>:<op>@<hook>")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        return {"mode": v} if isinstance(v, str) else v

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError("a value is a vector (a list of numbers), a file path or {'run': ...}; "
                             "for a scalar factor use op 'scale' with 'scale'")
        if isinstance(v, dict):
            kind = FileValue if "file" in v else RunValue if "run" in v else None
            if kind is None:
                raise ValueError(f"a value given as a mapping is {{'file': path, 'key': name}} or "
                                 f"{{'run': path, 'request': id, 'hook': name, 'position': p}}; got keys {sorted(v)}")
            extra = sorted(set(v) - set(kind.model_fields))
            if extra:
                raise ValueError(f"unknown key(s) {extra} in a {'file' if kind is FileValue else 'run'} value; "
                                 f"valid: {', '.join(kind.model_fields)}")
            return kind.model_validate(v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        op = self.op
        if op in VALUE_OPS and self.value is None:
            raise ValueError(f"op {op!r} needs a value: a list of numbers, a .npy/.safetensors/.pt path "
                             f"or {{'run': path, 'request': id}}")
        if op not in VALUE_OPS and self.value is not None:
            raise ValueError(f"op {op!r} takes no value (ops that take one: {', '.join(VALUE_OPS)})")
        if op == "patch" and not isinstance(self.value, RunValue):
            raise ValueError("op 'patch' takes its rows from a stored run: value={'run': path, 'request': id}")
        if op == "scale" and self.scale is None:
            raise ValueError("op 'scale' needs 'scale', the factor")
        if self.scale is not None and op not in ("add", "scale"):
            raise ValueError(f"'scale' applies to ops 'add' and 'scale', not {op!r}")
        if self.heads is not None:
            if op != "zero":
                raise ValueError(f"'heads' applies to op 'zero' (ablate heads), not {op!r}")
            if not self.heads or any(h < 0 for h in self.heads):
                raise ValueError("'heads' is a non-empty list of head indices >= 0")
        return self


def _request_filter():
    from dmi.spec import RequestFilter

    return RequestFilter()


def _token_filter():
    from dmi.spec import TokenFilter

    return TokenFilter()


def resolve_forward_refs() -> None:
    """RequestFilter and TokenFilter live in dmi.spec, which imports this module."""
    from dmi.spec import RequestFilter, TokenFilter

    Intervention.model_rebuild(_types_namespace={"RequestFilter": RequestFilter, "TokenFilter": TokenFilter})
