"""Who each row of a toy-engine step belongs to, as dmi's RowTable.

The engine's batch is flat, so the table is batch=1, tokens=num_tokens, and every hook tensor
[num_tokens, ...] is captured with flat=True. Request ids are the engine's own strings and
positions are the engine's (cache length + offset), so there is nothing to invent here.
"""
from __future__ import annotations

import numpy as np
from dmi.plan.rows import DECODE, PREFILL, RowTable

from .engine import StepBatch

_PHASE = {"prefill": PREFILL, "decode": DECODE}


def row_table(batch: StepBatch) -> RowTable:
    n = batch.num_tokens
    request_ids = [s.request_id for s in batch.segments]
    request = np.empty(n, dtype=np.int32)
    phase = np.empty(n, dtype=np.int8)
    for i, s in enumerate(batch.segments):
        request[s.start:s.stop] = i
        phase[s.start:s.stop] = _PHASE[s.phase]
    # A flat batch has no padding, so no row is -1 and there is no key mask.
    return RowTable(batch=1, tokens=n, request_ids=request_ids, request=request,
                    position=batch.positions.numpy().astype(np.int64, copy=True), phase=phase)
