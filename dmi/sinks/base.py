"""What a sink receives. Sinks run on their own thread; nothing here touches the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class HookInfo:
    """Static description of one captured hook, known once its first row has been seen."""

    name: str                 # canonical name, e.g. "blocks.0.hook_resid_post"
    dtype: str                # torch dtype name without "torch.": "float32", "bfloat16", "int64", ...
    row_shape: tuple[int, ...]  # shape of one token row; for ragged hooks (pattern) the last dim is the max seen
    ragged: bool = False      # True when the last dim grows per row (attention pattern: keys 0..position)
    source: str = ""          # where it came from, e.g. "model.layers.0:output"
    shard: tuple[int, int, int, int] | None = None  # tensor parallel: (dim, start, stop, full) of the row; dim -1: partial sum start of full


@dataclass
class RunMeta:
    """Written once when the sink opens; stored as file attributes."""

    dmi_version: str
    engine: str               # "hf", "vllm", ...
    model: str                # model name or path
    model_config: dict[str, Any]
    spec_json: str            # CaptureSpec.model_dump_json()
    extra: dict[str, Any] = field(default_factory=dict)


class RowBlock:
    """Rows of one hook from one or more whole steps, already on the host.

    `data` holds raw values: bfloat16 arrives as np.uint16 bit patterns with dtype "bfloat16"
    (numpy has no bf16), every other dtype as its numpy equivalent. For ragged hooks,
    `data` is [n, *row_shape[:-1], k] where k is this block's width; rows shorter than k
    are zero-padded (a causal attention pattern is exactly 0 there).

    Requests come as integer indices into the frame's id table (`request_index` into
    `request_ids`, one table shared by every block of a frame), so a sink maps ids once per
    frame; `request` is the same as a list of ids. The block is handed over: the drain never
    touches `data` again, so a sink may keep it without copying.
    """

    __slots__ = ("hook", "data", "request_index", "request_ids", "position", "step", "_request")

    def __init__(self, hook: HookInfo, data: np.ndarray, request: list[str] | None = None,
                 position: np.ndarray | None = None, step: np.ndarray | None = None,
                 request_index: np.ndarray | None = None, request_ids: list[str] | None = None):
        self.hook = hook
        self.data = data
        if request_index is None:
            request = list(request or [])
            request_ids = list(dict.fromkeys(request))
            where = {r: i for i, r in enumerate(request_ids)}
            request_index = np.fromiter((where[r] for r in request), dtype=np.int32, count=len(request))
        self.request_index = np.asarray(request_index, dtype=np.int32)
        self.request_ids = request_ids
        self._request = request
        self.position = position
        self.step = step

    @property
    def request(self) -> list[str]:
        """Request id per row."""
        if self._request is None:
            ids = self.request_ids
            self._request = [ids[i] for i in self.request_index.tolist()]
        return self._request


def block_rows(block: RowBlock) -> int:
    """The block's row count, after checking that every column has one entry per row."""
    n = int(np.shape(block.data)[0]) if np.ndim(block.data) else 0
    lens = (len(block.request_index), int(np.size(block.position)), int(np.size(block.step)))
    if lens != (n, n, n):
        raise ValueError(f"hook {block.hook.name!r}: {n} rows but {lens[0]} request ids, "
                         f"{lens[1]} positions and {lens[2]} steps")
    return n


@dataclass
class GapBlock:
    """Rows that were produced but not written (dropped), so a reader knows what is missing."""

    hook: str
    request: list[str]
    position: np.ndarray
    step: np.ndarray
    reason: str               # "ring_full", "oversize", "sink_error", ...


class Sink:
    """Base class for sinks. Called from one thread only (the sink thread), in this order:
    open(meta) once, then any number of write()/write_gaps(), then close(stats, complete).

    `stats_provider`, when the session sets it, returns the session's current stats dict; a
    sink that commits in steps may store it at each commit, so that a run which never reaches
    close() still has its books (the HDF5 sink does). It may be called from the sink thread.
    It leaves out the interventions' per-request ranges, which grow with every request a
    server steers: `books_provider` (None without interventions) returns those that changed
    since its last call, as (intervention, reason or "" for applied, request id, all its
    [start, stop) ranges now), for the sink to append. close(stats) gets the full books."""

    stats_provider: Callable[[], dict[str, Any]] | None = None
    books_provider: Callable[[], list[tuple[str, str, str, list[list[int]]]]] | None = None
    # True when a row is readable as soon as write() returns (no commit step): the session
    # counts it committed at once, not at the next flush().
    commits_on_write: bool = False

    def open(self, meta: RunMeta) -> None:
        raise NotImplementedError

    def write(self, block: RowBlock) -> None:
        raise NotImplementedError

    def write_gaps(self, gaps: GapBlock) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable and readable by another process."""

    def staging(self, info: HookInfo, n: int, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Where the drain gathers the next block of a hook's rows (their one host copy). The
        only method called from the drain thread, never concurrently with itself. By default a
        new array; a sink that writes in larger units hands out consecutive slices of its own
        buffers, so that adjacent blocks are one contiguous array it writes in one call."""
        return np.empty((n, *row_shape), dtype)

    def close(self, stats: dict[str, Any], complete: bool = True) -> None:
        raise NotImplementedError
