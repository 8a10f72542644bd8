"""Who each token row of an HF forward belongs to: request ids, positions, padding.

Request ids are "0", "1", ... in batch-row order, counting on across calls. Inside
`generate`, the batch rows of the first forward are new requests and later forwards
continue them; a row stops being recorded once it has emitted EOS (a lone sequence
would have stopped there). Every bare forward's batch rows are new requests.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from dmi.plan.rows import DECODE, PREFILL, RowTable


@dataclass
class GenerateState:
    eos_ids: set[int]
    request_ids: list[str] | None = None
    finished: np.ndarray | None = None
    forwards: int = 0
    # sync-free mode (GPU): where each row's next token goes, and the EOS tracker the drain resolves
    next_pos: np.ndarray | None = None
    user_mask: torch.Tensor | None = None  # generate's 2-D mask, for forwards given only 4-D masks (static cache)
    key_mask: np.ndarray | None = None
    late: "LateEos | None" = None
    decode_columns: tuple | None = None  # (tokens, request, phase) of this generate's decode tables
    keys_needed: bool = True  # some hook reads attention patterns: keep the key mask up to date


class LateEos:
    """Which requests of a generate ended at EOS, learned without stopping the GPU.

    Reading the fed tokens on the host each step would synchronize the compute stream. Instead
    each step's tokens go to pinned memory with an async copy, and the drain, which waits for
    the step anyway, resolves here (in step order) which batch rows were still alive; it filters
    out rows of requests that had ended, exactly as the synchronous path does before capture.
    """

    def __init__(self, eos_ids: set[int], batch: int):
        self.eos = np.array(sorted(eos_ids), dtype=np.int64)
        self.finished = np.zeros(batch, dtype=bool)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, fed tokens on the host), in order
        self._alive: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def add(self, step: int, fed: torch.Tensor) -> None:
        """Engine thread: the tokens fed at `step` ([batch], any device), copied without a sync
        (on a CPU, with numpy: this runs every decode step)."""
        if fed.is_cuda:
            host = torch.empty(fed.shape, dtype=fed.dtype, pin_memory=True)
            host.copy_(fed, non_blocking=True)
        else:
            host = fed.numpy().copy()
        with self._lock:
            self._pending.append((step, host))

    def alive(self, step: int) -> np.ndarray | None:
        """Drain thread, once `step` has completed on the device: batch rows not yet ended."""
        with self._lock:
            while self._pending and self._pending[0][0] <= step:
                s, host = self._pending.pop(0)
                self.finished |= np.isin(host if isinstance(host, np.ndarray) else host.numpy(), self.eos)
                self._alive[s] = ~self.finished
            for old in [k for k in self._alive if k < step]:
                del self._alive[old]
            return self._alive.get(step)


@dataclass
class RequestCounter:
    next_id: int = 0

    def take(self, n: int) -> list[str]:
        ids = [str(self.next_id + i) for i in range(n)]
        self.next_id += n
        return ids


def _first(kwargs: dict, args: tuple, name: str, index: int):
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    return args[index] if len(args) > index else None


@dataclass
class StepInputs:
    """The forward's arguments that say who its rows are (all tensors, so a compiled forward
    can hand them to an op)."""

    ref: torch.Tensor                 # input_ids, or inputs_embeds: [batch, tokens, ...]
    is_ids: bool                      # ref holds token ids (EOS can be seen)
    mask: torch.Tensor | None         # 2-D attention mask over cache + new tokens
    cache_position: torch.Tensor | None
    past: object = None               # the KV cache, when no cache_position says where we are


def step_inputs(args: tuple, kwargs: dict) -> StepInputs:
    input_ids = _first(kwargs, args, "input_ids", 0)
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("dmi: forward called without input_ids or inputs_embeds; cannot attribute rows")
    mask = kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        mask = None  # a 4-D mask, or a dict of them (static cache): see GenerateState.user_mask
    return StepInputs(ref, input_ids is not None, mask, kwargs.get("cache_position"), kwargs.get("past_key_values"))


def row_table(inp: StepInputs, counter: RequestCounter, gen: GenerateState | None, sync_free: bool = False,
              step: int = 0) -> RowTable:
    """The step's rows. With sync_free (GPU), decode steps of a generate read nothing from the
    device: positions and key mask continue from the prefill on the host, and EOS is resolved
    later by the drain (LateEos); only the prefill reads its mask, once per generate."""
    # Continue positions on the host: on a GPU (no device reads), and whenever the forward gets
    # no 2-D mask (a static cache passes prepared 4-D masks) but generate was given one.
    mirror = gen is not None and (sync_free or (inp.mask is None and gen.user_mask is not None))
    if mirror and gen.forwards > 0 and gen.next_pos is not None:
        table = _decode_rows_sync_free(inp, gen, step)
        if table is not None:
            return table
    ref, mask, cache_pos = inp.ref, inp.mask, inp.cache_position
    if (mask is None and gen is not None and gen.forwards == 0 and gen.user_mask is not None
            and tuple(gen.user_mask.shape) == tuple(ref.shape[:2])):
        mask, cache_pos = gen.user_mask, None  # the prefill covers the whole prompt
    input_ids = ref if inp.is_ids else None
    B, T = int(ref.shape[0]), int(ref.shape[1])
    past_len = 0
    if cache_pos is None and inp.past is not None and hasattr(inp.past, "get_seq_length"):
        past_len = int(inp.past.get_seq_length())

    if mask is not None:
        # numpy on the host copy: a decode step reads the mask every time, and each torch op
        # here costs several times its numpy twin
        m = mask.detach().to("cpu").numpy().astype(np.int64, copy=False)
        cols = (cache_pos.detach().to("cpu").numpy().astype(np.int64, copy=False) if cache_pos is not None
                else np.arange(m.shape[1] - T, m.shape[1]))
        real = m[:, cols] != 0
        position = np.cumsum(m, axis=1)[:, cols] - 1
        key_mask = m != 0
    else:
        start = int(cache_pos[0]) if cache_pos is not None else past_len
        real = np.ones((B, T), dtype=bool)
        position = np.broadcast_to(np.arange(start, start + T), (B, T)).copy()
        key_mask = None

    in_generate = gen is not None
    first = not in_generate or gen.forwards == 0
    if first:
        ids = counter.take(B)
        if in_generate:
            gen.request_ids = ids
            gen.finished = np.zeros(B, dtype=bool)
    else:
        ids = gen.request_ids
        if input_ids is not None and gen.eos_ids:
            # The token fed now is the one sampled last step: EOS there means this row is done.
            fed = input_ids[:, -1].detach().cpu().numpy()
            gen.finished |= np.isin(fed, list(gen.eos_ids))
        real &= ~gen.finished[:, None]
    if in_generate:
        gen.forwards += 1
        if mirror and first:
            gen.next_pos = position[:, -1].astype(np.int64) + 1
            gen.key_mask = key_mask if gen.keys_needed else None
            gen.late = LateEos(gen.eos_ids, B) if gen.eos_ids and input_ids is not None else None

    return _table(B, T, ids, real, position, PREFILL if first else DECODE, key_mask)


def _table(B, T, ids, real, position, phase, key_mask, late=None) -> RowTable:
    request = np.where(real, np.arange(B, dtype=np.int32)[:, None], -1).astype(np.int32).reshape(-1)
    return RowTable(batch=B, tokens=T, request_ids=ids, request=request,
                    position=np.asarray(position, dtype=np.int64).reshape(-1),
                    phase=np.full(B * T, phase, dtype=np.int8), key_mask=key_mask, late=late)


def _decode_rows_sync_free(inp: StepInputs, gen: GenerateState, step: int) -> RowTable | None:
    ref = inp.ref
    B, T = int(ref.shape[0]), int(ref.shape[1])
    if B != len(gen.request_ids):
        return None  # not the generate we know (the caller falls back to reading the device)
    # Every row is real (generate extends every row's mask by ones) and a decode: the request and
    # phase columns are the same every step of this shape (kept, read-only), and the positions
    # continue. Few array ops: this runs between every two forwards.
    fixed = gen.decode_columns
    if fixed is None or fixed[0] != T:
        request = np.repeat(np.arange(B, dtype=np.int32), T)
        gen.decode_columns = fixed = (T, request, np.full(B * T, DECODE, dtype=np.int8))
    position = gen.next_pos if T == 1 else (gen.next_pos[:, None] + np.arange(T)[None, :]).reshape(-1)
    gen.next_pos = gen.next_pos + T
    if gen.key_mask is not None:
        gen.key_mask = np.concatenate([gen.key_mask, np.ones((B, T), dtype=bool)], axis=1)
    if gen.late is not None and inp.is_ids:
        gen.late.add(step, ref[:, -1])
    gen.forwards += 1
    return RowTable(batch=B, tokens=T, request_ids=gen.request_ids, request=fixed[1], position=position,
                    phase=fixed[2], key_mask=gen.key_mask, late=gen.late)
