"""Row tables: who each row of a step's tensors belongs to.

The adapter says, before the forward, which request, position and phase every token row of the
step is. A step can have more than one *row group*: the token rows every layer sees
("tokens"), and rows addressed per request, such as the logits an engine computes for each
request's last token only ("logits"). A hook's tensor rows are the rows of its group's table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PREFILL, DECODE = 0, 1
TOKENS, LOGITS = "tokens", "logits"


@dataclass
class RowTable:
    """Who each row of a step's tensor belongs to. For the token group, rows are the step's tokens
    in [batch, tokens] order (an engine with a flat batch uses batch=1).

    A table's arrays are never written once handed to the session (the drain reads them later).
    An adapter may hand the very same `request` array and `request_ids` list again for a step
    whose rows are the same requests (a steady decode): the planner then reuses the last plan
    without running the filters (Planner.plan)."""

    batch: int
    tokens: int
    request_ids: list[str]       # the requests present in this step
    request: np.ndarray          # int32 [rows]: index into request_ids, -1 for padding
    position: np.ndarray         # int64 [rows]: position within the request, from 0
    phase: np.ndarray            # int8 [rows]: PREFILL or DECODE
    key_mask: np.ndarray | None = None   # bool [batch, keys]: real keys, for attention patterns
    # Rows whose request may have ended before this step, known only once the step ran on the
    # device (GPU, no sync): late.alive(step) -> bool [batch] or None, called by the drain.
    late: Any = None
    batch_row: np.ndarray | None = None  # int64 [rows]: batch row of each row (default row // tokens)

    @property
    def n_rows(self) -> int:
        return len(self.request)

    def batch_of(self, idx: np.ndarray) -> np.ndarray:
        return self.batch_row[idx] if self.batch_row is not None else idx // max(self.tokens, 1)

    def take(self, idx) -> "RowTable":
        """The rows `idx` of this table as a table of their own (-1: a padding row), e.g. one
        logits row per request at its last token."""
        idx = np.asarray(idx, dtype=np.int64)
        valid = idx >= 0
        at = np.where(valid, idx, 0)
        request = np.where(valid, self.request[at] if len(self.request) else -1, -1).astype(np.int32)
        return RowTable(batch=1, tokens=len(idx), request_ids=self.request_ids, request=request,
                        position=np.where(valid, self.position[at] if len(self.position) else 0, 0).astype(np.int64),
                        phase=np.where(valid, self.phase[at] if len(self.phase) else PREFILL, PREFILL).astype(np.int8),
                        key_mask=self.key_mask, late=self.late,
                        batch_row=np.where(valid, self.batch_of(at), 0).astype(np.int64))
