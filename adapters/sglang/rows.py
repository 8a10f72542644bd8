"""Who each row of an SGLang forward belongs to, read from its ForwardBatch.

SGLang's batch is flat: a prefill (extend) step holds every request's new tokens back to back,
request i at rows [start_i, start_i + extend_seq_lens_cpu[i]) and positions from
extend_prefix_lens_cpu[i] (what the KV cache already holds: an earlier chunk, or the radix
cache); a decode step holds one row per request at position seq_len - 1. Mixed batches are
extend batches whose decoding requests extend by one token. Rows past the real tokens (graph
padding) belong to no request.

The logits processor computes one row per request, for its last row; `last_rows` says which
rows of the step those are.

A retracted (preempted) request comes back as an extend over tokens it had computed before;
`Coverage` remembers how far each request got, and rows below that are not recorded again (its
logits neither: they hang off the step's rows).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dmi.plan.rows import DECODE, PREFILL, RowTable

# sglang.srt.constants.HEALTH_CHECK_RID_PREFIX: the server's /health probes are generate
# requests of its own, not user traffic; their rows are treated as padding (never recorded).
HEALTH_CHECK_PREFIX = "HEALTH_CHECK"


def row_table(fb, n_rows: int, recorded: dict[str, int] | None = None,
              names: list[str] | None = None) -> tuple[RowTable, np.ndarray]:
    """(rows of the step, index of each request's last row; -1 where a padded logits row is).
    `recorded`: per request, the first position not recorded yet; rows before it are left out.
    `names`: the row id of each of the batch's requests (default: its rid)."""
    mode = fb.forward_mode
    rids = list(names) if names is not None else [str(r) for r in (fb.rids or [])]
    request = np.full(n_rows, -1, dtype=np.int32)
    position = np.zeros(n_rows, dtype=np.int64)
    phase = np.full(n_rows, PREFILL, dtype=np.int8)
    if mode.is_decode():
        bs = len(rids)
        seq = np.asarray(fb.seq_lens_cpu[:bs], dtype=np.int64)
        request[:bs] = np.arange(bs, dtype=np.int32)
        position[:bs] = seq - 1
        phase[:bs] = DECODE
        last = np.arange(bs, dtype=np.int64)
    elif mode.is_extend() and fb.extend_seq_lens_cpu is not None:
        lens = np.asarray(fb.extend_seq_lens_cpu, dtype=np.int64)
        prefix = np.asarray(fb.extend_prefix_lens_cpu, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        total = int(lens.sum())
        if total > n_rows:
            raise RuntimeError(f"dmi: SGLang step has {total} extend tokens but its tensors hold {n_rows} rows")
        req = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        request[:total] = req
        position[:total] = prefix[req] + (np.arange(total) - starts[req])
        last = starts + lens - 1
    else:  # idle and modes dmi does not attribute (speculative verify, ...): nothing recorded
        rids, last = [], np.zeros(0, dtype=np.int64)
    probes = [i for i, r in enumerate(rids) if r.startswith(HEALTH_CHECK_PREFIX)]
    if probes:
        request[np.isin(request, probes)] = -1
    if recorded and rids:
        first_new = np.array([recorded.get(r, 0) for r in rids], dtype=np.int64)
        real = request >= 0
        again = real & (position < first_new[np.where(real, request, 0)])
        request[again] = -1
    return RowTable(batch=1, tokens=n_rows, request_ids=rids, request=request, position=position,
                    phase=phase), last


def extend_gaps(fb, names: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(request id, first new position, prefix length) of each extending request."""
    if not fb.forward_mode.is_extend() or fb.extend_prefix_lens_cpu is None:
        return []
    ids = names if names is not None else fb.rids or []
    return [(str(r), int(p), int(n)) for r, p, n in zip(ids, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)]


class Coverage:
    """How far each request's positions have been computed while dmi watched, to tell a radix
    cache hit (positions the engine never computed) from the previous chunk of a chunked
    prefill (computed, already recorded). Requests already in flight when the session opened
    (`started`) computed their first positions unwatched: those are reported "before_attach"."""

    def __init__(self, limit: int = 1 << 16, started=()):
        self.started = set(started)
        self.done: OrderedDict[str, int] = OrderedDict()
        self.before: dict[str, int] = {}
        self.limit = limit

    def step(self, fb, names: list[str] | None = None) -> list[tuple[str, np.ndarray, str]]:
        """Advance with this step; return (request, positions, reason) for positions the session
        will never see computed: "prefix_cache", or "before_attach" for a request in flight at
        attach. `before` keeps where each of the step's requests stood (row_table's `recorded`)."""
        skipped = []
        ids = names if names is not None else [str(r) for r in (fb.rids or [])]
        self.before = {r: self.done[r] for r in ids if r in self.done}
        if fb.forward_mode.is_decode():
            for rid, seq in zip(ids, fb.seq_lens_cpu.tolist()):
                rid, seq = str(rid), int(seq)
                if rid not in self.done and rid in self.started and seq > 1:
                    skipped.append((rid, np.arange(0, seq - 1, dtype=np.int64), "before_attach"))
                self._set(rid, seq)
            return skipped
        for rid, prefix, n in extend_gaps(fb, ids):
            if rid.startswith(HEALTH_CHECK_PREFIX):
                continue
            seen = self.done.get(rid, 0)
            if prefix > seen:
                reason = "before_attach" if rid not in self.done and rid in self.started else "prefix_cache"
                skipped.append((rid, np.arange(seen, prefix, dtype=np.int64), reason))
            self._set(rid, max(seen, prefix + n))
        return skipped

    def _set(self, rid: str, n: int) -> None:
        self.done[rid] = n
        self.done.move_to_end(rid)
        while len(self.done) > self.limit:
            self.done.popitem(last=False)
