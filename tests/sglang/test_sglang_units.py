"""The SGLang adapter's pieces that need no engine: row attribution from a ForwardBatch,
radix-cache coverage, version and CUDA-graph refusals. They run in every venv."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from dmi.adapters.sglang import control
from dmi.adapters.sglang.frontend import check_version
from dmi.adapters.sglang.rows import Coverage, row_table

from dmi.errors import EngineNotSupportedError
from dmi.plan.rows import DECODE, PREFILL


class Mode:
    def __init__(self, kind):
        self.kind = kind

    def is_decode(self):
        return self.kind == "decode"

    def is_extend(self):
        return self.kind in ("extend", "mixed")


def batch(kind, rids, seq_lens=None, ext=None, prefix=None):
    return types.SimpleNamespace(forward_mode=Mode(kind), rids=rids,
                                 seq_lens_cpu=None if seq_lens is None else torch.tensor(seq_lens),
                                 extend_seq_lens_cpu=ext, extend_prefix_lens_cpu=prefix)


def test_extend_rows_follow_start_locations_and_prefixes():
    # request a: new tokens 0..2; b: a later chunk, positions 5..8; c: one token (a mixed-in decode)
    fb = batch("mixed", ["a", "b", "c"], ext=[3, 4, 1], prefix=[0, 5, 9])
    rows, last = row_table(fb, 10)  # two padding rows
    assert rows.request_ids == ["a", "b", "c"]
    assert rows.request.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, -1, -1]
    assert rows.position[:8].tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert (rows.phase[:8] == PREFILL).all()
    assert last.tolist() == [2, 6, 7]


def test_decode_rows_are_one_per_request_at_seq_len_minus_one():
    fb = batch("decode", ["x", "y"], seq_lens=[7, 3, 1])  # a padded third slot
    rows, last = row_table(fb, 3)
    assert rows.request.tolist() == [0, 1, -1]
    assert rows.position[:2].tolist() == [6, 2]
    assert (rows.phase[:2] == DECODE).all()
    assert last.tolist() == [0, 1]


def test_health_probes_are_never_recorded():
    fb = batch("extend", ["HEALTH_CHECK_1f", "u"], ext=[2, 2], prefix=[0, 3])
    rows, _ = row_table(fb, 4)
    assert rows.request.tolist() == [-1, -1, 1, 1]
    assert [r for r, _, _ in Coverage().step(fb)] == ["u"]


def test_more_extend_tokens_than_rows_is_an_error():
    with pytest.raises(RuntimeError, match="extend tokens"):
        row_table(batch("extend", ["a"], ext=[5], prefix=[0]), 4)


def test_coverage_tells_radix_hits_from_earlier_chunks():
    cov = Coverage()
    skipped = cov.step(batch("extend", ["a", "b"], ext=[4, 3], prefix=[0, 6]))
    assert [(r, p.tolist(), why) for r, p, why in skipped] == [("b", [0, 1, 2, 3, 4, 5], "prefix_cache")]
    assert cov.step(batch("extend", ["a"], ext=[4], prefix=[4])) == []           # a: second chunk
    assert cov.step(batch("decode", ["a", "b"], seq_lens=[9, 10])) == []
    assert cov.done == {"a": 9, "b": 10}


def test_requests_in_flight_at_attach_report_their_unwatched_positions():
    # "c" was mid chunked prefill and "d" decoding when the session opened; "e" arrives after
    # with a radix-cache hit.
    cov = Coverage(started={"c", "d"})
    skipped = cov.step(batch("extend", ["c", "e"], ext=[4, 2], prefix=[8, 3]))
    assert [(r, p.tolist(), why) for r, p, why in skipped] == [
        ("c", list(range(8)), "before_attach"), ("e", [0, 1, 2], "prefix_cache")]
    skipped = cov.step(batch("decode", ["c", "d"], seq_lens=[13, 6]))
    assert [(r, p.tolist(), why) for r, p, why in skipped] == [("d", [0, 1, 2, 3, 4], "before_attach")]
    assert cov.step(batch("decode", ["c", "d"], seq_lens=[14, 7])) == []


def test_a_retracted_request_recomputed_is_recorded_once():
    cov = Coverage()
    first = batch("extend", ["r"], ext=[5], prefix=[0])
    cov.step(first)
    rows, _ = row_table(first, 5, cov.before)
    assert rows.request.tolist() == [0] * 5
    for seq in (6, 7):                                      # two decode steps: positions 5, 6
        fb = batch("decode", ["r"], seq_lens=[seq])
        cov.step(fb)
        assert row_table(fb, 1, cov.before)[0].request.tolist() == [0]
    # Retracted, then re-prefilled in two chunks with the new request "s" beside it: positions
    # 0..6 were recorded, 7 is new; its logits row (the chunk's last row) only in the second chunk.
    chunk1 = batch("extend", ["r", "s"], ext=[4, 2], prefix=[0, 0])
    assert cov.step(chunk1) == []
    rows, last = row_table(chunk1, 6, cov.before)
    assert rows.request.tolist() == [-1, -1, -1, -1, 1, 1]
    chunk2 = batch("extend", ["r"], ext=[4], prefix=[4])
    cov.step(chunk2)
    rows, last = row_table(chunk2, 4, cov.before)
    assert rows.request.tolist() == [-1, -1, -1, 0] and rows.position.tolist() == [4, 5, 6, 7]
    assert rows.request[last].tolist() == [0]
    nxt = batch("decode", ["r"], seq_lens=[9])
    cov.step(nxt)
    assert row_table(nxt, 1, cov.before)[0].request.tolist() == [0]


def test_coverage_is_bounded():
    cov = Coverage(limit=2)
    for r in "abc":
        cov.step(batch("extend", [r], ext=[1], prefix=[0]))
    assert list(cov.done) == ["b", "c"]


def test_unsupported_sglang_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(__version__="0.4.9"))
    with pytest.raises(EngineNotSupportedError, match="supports sglang 0.5.23; this is sglang 0.4.9"):
        check_version()


def test_attach_after_cuda_graph_capture_says_to_arm_at_construction(monkeypatch):
    runner = types.SimpleNamespace(decode_cuda_graph_runner=object(), prefill_cuda_graph_runner=None)
    monkeypatch.setitem(control._STATE, "runner", runner)
    monkeypatch.setitem(control._STATE, "session", None)
    with pytest.raises(control.CudaGraphAttachError, match="Arm dmi at construction: set the environment variable DMI_SPEC"):
        control.open_session('{"hooks": ["resid"]}')
    assert control._STATE["session"] is None
    np.testing.assert_equal(control.handle("status")["open"], False)


def test_a_capture_that_raises_is_reported_once_and_never_reaches_the_engine():
    from dmi.adapters.sglang.hooks import SBinding
    from dmi.adapters.sglang.tables.base import STap, Where
    from dmi.adapters.sglang.worker import SGLangWorkerAdapter, _capture

    warned = []
    session = types.SimpleNamespace(frame=object(), wants=lambda i: True, capture=lambda *a, **k: None,
                                    _warn_once=lambda key, msg: warned.append((key, msg)))
    adapter = SGLangWorkerAdapter.__new__(SGLangWorkerAdapter)
    adapter.session = session
    adapter.map = types.SimpleNamespace(dims=types.SimpleNamespace(n_heads=2, n_kv_heads=1, head_dim=2))
    b = SBinding("blocks.0.hook_x", "m:output", 4, tap=STap(lambda l, d: None, view="bogus"), where=Where("m"))
    _capture(adapter, 0, b, (), {}, torch.zeros(3, 4))  # must not raise
    assert len(warned) == 1 and "blocks.0.hook_x" in warned[0][1] and "bogus" in warned[0][1]


@pytest.mark.parametrize("served", [False, True])
def test_a_scheduler_that_cannot_arm_stops_a_served_engine_only(monkeypatch, served):
    """Offline, the engine keeps working and dmi.attach reports the failure; served, the
    scheduler raises (the server does not come up serving requests without their capture or
    steering)."""
    def fail(spec, at_start=False):
        raise OSError("disk full")

    monkeypatch.setattr(control, "open_session", fail)
    monkeypatch.setitem(control._STATE, "session", None)
    monkeypatch.setitem(control._STATE, "arm_error", None)
    monkeypatch.setenv(control.ENV_SPEC, '{"hooks": ["resid"]}')
    if served:
        monkeypatch.setenv(control.ENV_SERVED, "1")
        with pytest.raises(OSError, match="disk full"):
            control.arm_from_env()
    else:
        monkeypatch.delenv(control.ENV_SERVED, raising=False)
        control.arm_from_env()
    assert control.handle("status")["arm_error"] == "OSError: disk full"
