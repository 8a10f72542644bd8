from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dmi.sinks.base import GapBlock, RowBlock, RunMeta, Sink


@dataclass
class Rows:
    """One block of rows as the callback sees it: torch data in its real dtype (bf16 restored)."""

    hook: str
    dtype: str
    data: torch.Tensor
    request: list[str]
    position: np.ndarray
    step: np.ndarray


def resolve_target(target: str) -> Callable:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"sink.target: {target!r} is not 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"sink.target: cannot import {target!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"sink.target: {target!r} is not callable")
    return fn


class CallbackSink(Sink):
    def __init__(self, target: str | Callable):
        self.fn = resolve_target(target) if isinstance(target, str) else target
        self.meta: RunMeta | None = None

    def open(self, meta: RunMeta) -> None:
        self.meta = meta
        if hasattr(self.fn, "open"):
            self.fn.open(meta)

    def write(self, block: RowBlock) -> None:
        data = torch.from_numpy(np.ascontiguousarray(block.data))
        if block.hook.dtype == "bfloat16":  # numpy carries bf16 as its uint16 bit patterns
            data = data.view(torch.bfloat16)
        self.fn(Rows(block.hook.name, block.hook.dtype, data, list(block.request), block.position, block.step))

    def write_gaps(self, gaps: GapBlock) -> None:
        if hasattr(self.fn, "gaps"):
            self.fn.gaps(gaps)

    def close(self, stats: dict, complete: bool = True) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close(stats, complete)
