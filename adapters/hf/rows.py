"""Who each token row of an HF forward belongs to: request ids, positions, padding.

Request ids are "0", "1", ... in batch-row order, counting on across calls. Inside
`generate`, the batch rows of the first forward are new requests and later forwards
continue them; a row stops being recorded once it has emitted EOS (a lone sequence
would have stopped there). Every bare forward's batch rows are new requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmi.ring.frames import DECODE, PREFILL, RowTable


@dataclass
class GenerateState:
    eos_ids: set[int]
    request_ids: list[str] | None = None
    finished: np.ndarray | None = None
    forwards: int = 0


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
    if mask is not None and mask.dim() != 2:
        mask = None  # a 4-D custom mask: treat every token as real
    return StepInputs(ref, input_ids is not None, mask, kwargs.get("cache_position"), kwargs.get("past_key_values"))


def row_table(inp: StepInputs, counter: RequestCounter, gen: GenerateState | None) -> RowTable:
    ref, mask, cache_pos = inp.ref, inp.mask, inp.cache_position
    input_ids = ref if inp.is_ids else None
    B, T = int(ref.shape[0]), int(ref.shape[1])
    past_len = 0
    if cache_pos is None and inp.past is not None and hasattr(inp.past, "get_seq_length"):
        past_len = int(inp.past.get_seq_length())

    if mask is not None:
        m = mask.detach().to("cpu", torch.int64)
        cols = (cache_pos.detach().cpu().long() if cache_pos is not None
                else torch.arange(m.shape[1] - T, m.shape[1]))
        real = m[:, cols].bool().numpy()
        position = (m.cumsum(1)[:, cols] - 1).numpy()
        key_mask = m.bool().numpy()
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

    request = np.where(real, np.arange(B, dtype=np.int32)[:, None], -1).astype(np.int32).reshape(-1)
    phase = np.full(B * T, PREFILL if first else DECODE, dtype=np.int8)
    return RowTable(batch=B, tokens=T, request_ids=ids, request=request,
                    position=position.astype(np.int64).reshape(-1), phase=phase, key_mask=key_mask)
