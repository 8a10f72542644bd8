"""The vLLM adapter's row book without an engine: who each row belongs to, what is recorded
once, and why positions were never seen computed."""
from __future__ import annotations

import numpy as np

from dmi.adapters.vllm.rows import RowBook


def _step(book, reqs, counts, positions, num_tokens, num_prompt):
    return book.step(reqs, np.array(counts), np.array(positions), np.array(num_tokens), np.array(num_prompt))


def test_prefix_cache_and_before_attach_gaps():
    # "old-12345678" was decoding when the session opened (at position 6); "new-abcdefgh" is
    # new with 4 prompt tokens served from the prefix cache.
    book = RowBook(started={"old"})
    rows = _step(book, ["old-12345678", "new-abcdefgh"], [1, 2], [6, 4, 5], [7, 6], [3, 6])
    assert [(r, p.tolist(), why) for r, p, why in rows.skipped] == [
        ("old", [0, 1, 2, 3, 4, 5], "before_attach"), ("new", [0, 1, 2, 3], "prefix_cache")]
    assert rows.tokens.request.tolist() == [0, 1, 1] and rows.tokens.request_ids == ["old", "new"]
    assert rows.logits.request.tolist() == [0, 1]
    # logits rows: "old" sampled at its last prompt position (2) and decoded at 3, 4, 5 before the
    # session opened; "new" never had a logits row at a cached prompt position
    assert [(r, p.tolist(), why) for r, p, why in rows.skipped_logits] == [("old", [2, 3, 4, 5], "before_attach")]


def test_a_prefix_cache_hit_misses_no_logits_row():
    # 8 prompt tokens, the first 6 served from the cache; then chunked: 1 token, then the last
    book = RowBook()
    rows = _step(book, ["p-12345678"], [1], [6], [8], [8])
    assert [(r, p.tolist()) for r, p, _ in rows.skipped] == [("p", [0, 1, 2, 3, 4, 5])]
    assert rows.skipped_logits == [] and rows.logits.request.tolist() == [-1]   # a chunk short of the end
    rows = _step(book, ["p-12345678"], [1], [7], [8], [8])
    assert rows.skipped == [] and rows.skipped_logits == [] and rows.logits.request.tolist() == [0]


def test_preempted_request_recomputed_is_recorded_once():
    book = RowBook()
    _step(book, ["r-12345678"], [4], [0, 1, 2, 3], [4], [4])
    _step(book, ["r-12345678"], [1], [4], [5], [4])
    rows = _step(book, ["r-12345678"], [6], [0, 1, 2, 3, 4, 5], [6], [4])   # preempted, recomputed
    assert rows.tokens.request.tolist() == [-1, -1, -1, -1, -1, 0] and not rows.skipped
    assert rows.logits.request.tolist() == [0]
