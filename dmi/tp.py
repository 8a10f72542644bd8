"""Tensor-parallel arithmetic every engine adapter shares: what one rank of a Megatron-style split
(vLLM's and SGLang's column/row parallel layers) holds of each row. Both engines split q heads,
kv heads and MLP features evenly, and replicate kv heads when there are fewer than ranks."""
from __future__ import annotations

from dataclasses import replace

from dmi.dims import Dims

Shard = tuple[int, int, int, int]  # (row dim, start, stop, full size), as the capture file records it
# Row dim -1: the rank holds one of `full` partial sums (a row-parallel projection before its
# all-reduce, which SGLang fuses into the next residual add): part `start` of them; the row is their sum.
PARTIAL = -1


def rank_dims(full: Dims, tp_size: int) -> Dims:
    """The dimensions one of `tp_size` ranks computes with."""
    if tp_size == 1:
        return full
    return replace(full, n_heads=full.n_heads // tp_size, n_kv_heads=max(1, full.n_kv_heads // tp_size),
                   intermediate=full.intermediate // tp_size)


def shard(kind: str | None, full: Dims, tp_size: int, tp_rank: int) -> Shard | None:
    """The slice of a row split by `kind` (heads | kv_heads | mlp) that rank `tp_rank` holds, or its
    part of a row every rank holds a partial sum of (kind "partial"); None for a whole row."""
    if tp_size == 1 or kind is None:
        return None
    if kind == "partial":
        return (PARTIAL, tp_rank, tp_rank + 1, tp_size)
    total = {"heads": full.n_heads, "kv_heads": full.n_kv_heads, "mlp": full.intermediate}[kind]
    if kind == "kv_heads" and total < tp_size:
        # Fewer kv heads than ranks: each is replicated over tp_size // total ranks in turn.
        head = tp_rank // (tp_size // total)
        return (0, head, head + 1, total)
    n = total // tp_size
    return (0, tp_rank * n, (tp_rank + 1) * n, total)


def rank_path(path: str, rank: int) -> str:
    """The file tensor-parallel rank `rank` writes beside rank 0's `path` (dmi.open finds it there)."""
    return path if rank == 0 else f"{path}.rank{rank}"


def rank_sink(sink, rank: int, tp_size: int):
    """The sink tensor-parallel rank `rank` writes: rank 0 the spec's, rank r "<path>.rank<r>"
    beside it (rank_path)."""
    from dmi.errors import SpecError

    if rank == 0:
        return sink
    if isinstance(sink, str) and sink != "memory":  # ("memory" names the memory sink, not a file)
        return rank_path(sink, rank)
    if isinstance(sink, dict) and "path" in sink:
        return {**sink, "path": rank_path(sink["path"], rank)}
    raise SpecError("sink", f"this engine runs {tp_size} tensor-parallel ranks and each writes its own file "
                            f"(<path>.rank<r> beside rank 0's); give the sink as a path, or a dict with "
                            f"'path', not {sink!r}")
