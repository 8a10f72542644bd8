"""Who each token row of a vLLM step belongs to, from the model runner's own batch state.

Per step the runner lays out the scheduled tokens of `input_batch.req_ids` (an order that
changes from step to step) back to back, `num_scheduled_tokens[req]` each; `positions`
(the model's first input) says where each token sits in its request. Rows past the
scheduled tokens are padding. The logits processor sees one row per request: its last
scheduled token; a chunk that stops short of the request's end samples nothing, so its
logits row is not recorded.

Recording, per request, the first position not yet recorded makes two engine behaviours
visible instead of silent:
- a step that starts past it (a prefix-cache hit) reports the skipped positions as
  not computed (reason "prefix_cache"; "before_attach" for a request already in the batch
  when the session opened, whose first positions were computed unwatched);
- a step that starts before it (a preempted request recomputed from scratch) repeats
  positions already on file, which are not recorded twice.

Logits rows exist only where a request samples: its last prompt position and every decode
position after it. So of the positions a step skipped, only those (`skipped_logits`) are
missing logits rows; a prefix-cache hit never is one, since the engine always computes the
last prompt token. The worker records `skipped` as gaps of the token hooks and
`skipped_logits` as gaps of the logits hook.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmi.plan.rows import DECODE, PREFILL, RowTable


def external_id(req_id: str) -> str:
    """vLLM's engine ids are "<user id>-<8 random chars>"; users see only the first part."""
    return req_id[:-9] if len(req_id) > 9 and req_id[-9] == "-" else req_id


@dataclass
class StepRows:
    tokens: RowTable
    logits: RowTable
    skipped: list[tuple[str, np.ndarray, str]]   # (request, positions, reason) never seen computed
    # the same for logits rows: the skipped positions that would have had one
    skipped_logits: list[tuple[str, np.ndarray, str]] = field(default_factory=list)


@dataclass
class RowBook:
    next_pos: dict[str, int] = field(default_factory=dict)     # first position not yet recorded
    next_logit: dict[str, int] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)   # in the batch when the session opened

    def forget(self, names) -> None:
        """names: the row ids of finished requests (what `step` recorded them under)."""
        for name in names:
            self.next_pos.pop(name, None)
            self.next_logit.pop(name, None)

    def step(self, req_ids: list[str], counts: np.ndarray, positions: np.ndarray, num_tokens: np.ndarray,
             num_prompt: np.ndarray, names: list[str] | None = None) -> StepRows:
        """req_ids: the batch's engine ids in row order; counts: scheduled tokens of each;
        positions: every row's position (padded length); num_tokens / num_prompt: each
        request's known tokens (prompt + output) and prompt length; names: the row id of each
        request (default: its external id)."""
        n = len(positions)
        request = np.full(n, -1, np.int32)
        position = np.zeros(n, np.int64)
        phase = np.full(n, PREFILL, np.int8)
        ids = names if names is not None else [external_id(r) for r in req_ids]
        l_request = np.full(len(req_ids), -1, np.int32)
        l_position = np.zeros(len(req_ids), np.int64)
        l_phase = np.full(len(req_ids), PREFILL, np.int8)
        skipped, skipped_logits = [], []
        start = 0
        for i, (ext, c) in enumerate(zip(ids, counts)):
            c = int(c)
            pos = positions[start:start + c]
            end = start + c
            if c == 0:
                continue
            first, last = int(pos[0]), int(pos[-1])
            seen = self.next_pos.get(ext, 0)
            if first > seen:
                why = "before_attach" if ext in self.started and ext not in self.next_pos else "prefix_cache"
                skipped.append((ext, np.arange(seen, first, dtype=np.int64), why))
                sampled_from = max(seen, int(num_prompt[i]) - 1)  # the first position with a logits row
                if first > sampled_from:
                    skipped_logits.append((ext, np.arange(sampled_from, first, dtype=np.int64), why))
            fresh = pos >= seen
            request[start:end] = np.where(fresh, i, -1)
            position[start:end] = pos
            decode = c == 1 and first >= int(num_prompt[i])
            phase[start:end] = DECODE if decode else PREFILL
            self.next_pos[ext] = max(seen, last + 1)
            complete = last + 1 >= int(num_tokens[i])  # this chunk reaches the request's end: it samples
            if complete and last >= self.next_logit.get(ext, 0):
                l_request[i] = i
                self.next_logit[ext] = last + 1
            l_position[i] = last
            l_phase[i] = DECODE if decode else PREFILL
            start = end
        tokens = RowTable(batch=1, tokens=n, request_ids=ids, request=request, position=position, phase=phase)
        logits = RowTable(batch=1, tokens=len(ids), request_ids=ids, request=l_request, position=l_position,
                          phase=l_phase)
        return StepRows(tokens, logits, skipped, skipped_logits)
