"""Loading an intervention's value: inline numbers, a .npy/.safetensors/.pt file, a stored run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmi.errors import SpecError

from .spec import FileValue, RunValue

FILE_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth")


def load(value, field: str, hook: str) -> tuple[np.ndarray | torch.Tensor, np.ndarray | None]:
    """(the value as an array or tensor, the stored positions for a run's rows or None).
    A run value gives all its rows [n, ...] with their positions; anything else one array."""
    if isinstance(value, str):
        value = FileValue(file=value)
    if isinstance(value, FileValue):
        return _from_file(value, field), None
    if isinstance(value, RunValue):
        return _from_run(value, field, hook)
    return np.asarray(value, dtype=np.float64), None


def _from_file(v: FileValue, field: str):
    p = Path(v.file)
    if p.suffix not in FILE_SUFFIXES:
        raise SpecError(field, f"{v.file!r}: a value file is {', '.join(FILE_SUFFIXES)}")
    if not p.is_file():
        raise SpecError(field, f"value file {v.file!r} does not exist")
    try:
        if p.suffix == ".npy":
            if v.key is not None:
                raise SpecError(field, f"{v.file!r}: a .npy file holds one array; drop 'key'")
            return np.load(p, allow_pickle=False)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _pick(load_file(str(p)), v, field)
        obj = torch.load(p, map_location="cpu", weights_only=True)
        return obj if isinstance(obj, torch.Tensor) and v.key is None else _pick(obj, v, field)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(field, f"cannot read value file {v.file!r}: {type(e).__name__}: {e}") from None


def _pick(obj, v: FileValue, field: str):
    if isinstance(obj, torch.Tensor):
        raise SpecError(field, f"{v.file!r} holds one tensor; drop 'key'")
    if not isinstance(obj, dict) or not obj:
        raise SpecError(field, f"{v.file!r} holds no tensors")
    if v.key is None:
        if len(obj) != 1:
            raise SpecError(field, f"{v.file!r} holds {len(obj)} tensors; name one with 'key': {', '.join(sorted(obj))}")
        return next(iter(obj.values()))
    if v.key not in obj:
        raise SpecError(f"{field}.key", f"{v.file!r} has no tensor {v.key!r}; it has {', '.join(sorted(map(str, obj)))}")
    return obj[v.key]


def _from_run(v: RunValue, field: str, hook: str):
    import dmi

    hook = v.hook or hook
    try:
        run = dmi.open(v.run)
    except Exception as e:
        raise SpecError(f"{field}.run", f"cannot open stored run {v.run!r}: {e}") from None
    try:
        if hook not in run.hooks:
            raise SpecError(f"{field}.hook", f"stored run {v.run!r} has no hook {hook!r}; it has {', '.join(run.hooks)}")
        if v.request not in run.requests:
            raise SpecError(f"{field}.request", f"stored run {v.run!r} has no request {v.request!r} "
                                                f"(it has {len(run.requests)}: {', '.join(run.requests[:8])})")
        rows = run.get(hook, v.request)
        pos = run.positions(hook, v.request).numpy().astype(np.int64)
    finally:
        close = getattr(run, "close", None)
        if close is not None:
            close()
    if not len(pos):
        raise SpecError(f"{field}.request", f"stored run {v.run!r} has no rows of request {v.request!r} at {hook!r}")
    return rows, pos


def as_rows(data, row_shape: tuple[int, ...], dtype: torch.dtype, field: str, hook: str, many: bool) -> torch.Tensor:
    """The value as [n, *row_shape] of the hook's dtype; one row unless `many` (stored rows).
    A single row may be given flat ([heads * head_dim] for a [heads, head_dim] hook)."""
    t = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    if t.is_complex() or t.dtype == torch.bool:
        raise SpecError(field, f"a value must hold real numbers, got dtype {t.dtype}")
    size = int(np.prod(row_shape))
    if many:
        if tuple(t.shape[1:]) != tuple(row_shape):
            raise SpecError(field, f"stored rows have shape {tuple(t.shape[1:])}; {hook} rows are {tuple(row_shape)}")
    else:
        if tuple(t.shape) not in (tuple(row_shape), (size,)):
            raise SpecError(field, f"shape {tuple(t.shape)} does not fit {hook}, whose rows are {tuple(row_shape)}"
                                   + (f" (or flat ({size},))" if len(row_shape) > 1 else ""))
        t = t.reshape(1, *row_shape)
    out = t.to(dtype)
    if not torch.isfinite(out).all():
        raise SpecError(field, f"the value has non-finite entries (inf or nan) in {dtype}")
    return out
