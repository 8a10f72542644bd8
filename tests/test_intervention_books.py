"""The interventions' books: per-step rows folded into [start, stop) ranges per request."""
from __future__ import annotations

import numpy as np

from dmi.interventions import books as B


def _books():
    return B.Books([{"name": "a", "hook": "h", "op": "add", "hooks": ["h"], "capture": "after"},
                    {"name": "b", "hook": "h", "op": "zero", "hooks": ["h"], "capture": "after"}])


def test_prefill_then_decodes_make_one_range_per_request():
    b = _books()
    b.record(0, ["x", "y"], np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]))  # prefill
    for step in range(3):  # decodes: one row each, request order changes between steps
        b.record(0, ["y", "x"], np.array([0, 1]), np.array([2 + step, 3 + step]))
    b.record(1, ["x"], np.array([0, 0]), np.array([7, 9]), reason="prefix_cache")
    got = b.snapshot()
    assert got["a"]["requests"] == {"x": [[0, 6]], "y": [[0, 5]]} and got["a"]["rows"] == 11
    assert got["b"]["requests"] == {} and got["b"]["failed"] == {"prefix_cache": {"x": [[7, 8], [9, 10]]}}
    assert got["b"]["failed_rows"] == 2
    b.record(0, ["x"], np.array([0]), np.array([6]))
    assert b.snapshot()["a"]["requests"]["x"] == [[0, 7]]  # a later fold extends the range


def test_unread_books_fold_on_their_own(monkeypatch):
    monkeypatch.setattr(B, "FOLD_AFTER", 10)
    b = _books()
    for p in range(25):
        b.record(0, ["x"], np.array([0]), np.array([p]))
    assert len(b._pending) <= 10
    assert b.snapshot()["a"]["requests"] == {"x": [[0, 25]]}


def test_take_changes_returns_what_changed_since_the_last_call_with_its_whole_ranges():
    b = _books()
    b.record(0, ["x", "y"], np.array([0, 0, 1]), np.array([0, 1, 0]))
    assert b.take_changes() == [("a", "", "x", [[0, 2]]), ("a", "", "y", [[0, 1]])]
    assert b.take_changes() == []
    b.record(0, ["x"], np.array([0]), np.array([2]))
    b.record(1, ["y"], np.array([0]), np.array([4]), reason="prefix_cache")
    assert b.take_changes() == [("a", "", "x", [[0, 3]]), ("b", "prefix_cache", "y", [[4, 5]])]
    assert b.snapshot(per_request=False)["a"] == {**b.entries[0], "rows": 4, "failed_rows": 0}


def _steered_serve(path, n_requests: int, close: bool):
    """A server steering `n_requests` requests, 8 at a time, 4 decode positions per commit:
    the HDF5 sink commits every few steps, as the drain does."""
    import dmi
    from dmi.sinks.base import RunMeta
    from dmi.sinks.hdf5 import HDF5Sink

    b = _books()
    sink = HDF5Sink(str(path), flush_every_s=3600)
    sink.stats_provider = lambda: {"interventions": b.snapshot(per_request=False)}
    sink.books_provider = b.take_changes
    sink.open(RunMeta(dmi_version=dmi.__version__, engine="test", model="none", model_config={}, spec_json="{}"))
    sizes = []
    for first in range(0, n_requests, 8):
        ids = [f"r{first + j}" for j in range(8)]
        b.record(0, ids, np.repeat(np.arange(8), 3), np.tile(np.arange(3), 8))  # prefill
        for pos in range(3, 15):
            b.record(0, ids, np.arange(8), np.full(8, pos))
            if first % 16 == 0 and pos == 9:
                b.record(1, ids[:2], np.array([0, 1]), np.array([pos, pos]), reason="no_slot")
            if pos % 4 == 0:
                sink.flush()
                sizes.append(len(sink._file["stats"].attrs["json"]))
    if close:
        sink.close({"interventions": b.snapshot()})
    else:
        sink.flush()
        sink._file.close()  # killed after its last commit: no close
    return b, sizes


def test_a_long_steered_serve_commits_each_change_once_and_reads_back_whole(tmp_path):
    """The stats JSON a commit rewrites stays the same size however many requests were steered
    (it was the whole per-request books, rewritten at every commit: a file growing with the
    square of the requests); the per-request ranges are appended as they change, and the
    reader joins them back, live or closed, to exactly the books the session kept."""
    import h5py

    import dmi

    for close in (True, False):
        path = tmp_path / f"serve-{close}.h5"
        b, sizes = _steered_serve(path, 400, close)
        assert max(sizes) < 1000, "the committed stats grow with the requests"  # the old books: ~20 KB
        with h5py.File(path) as f:
            rows = f["books"]["start"].shape[0]
            stats = f["stats"].attrs["json"]
        # each request is active over 4 commits (one change each), plus the "no_slot" ranges
        assert rows <= 400 * 4 + 2 * 25 * 2
        run = dmi.open(str(path))
        assert run.interventions == b.snapshot()
        assert run.interventions["a"]["requests"]["r399"] == [[0, 15]]
        assert run.interventions["b"]["failed"]["no_slot"]["r16"] == [[9, 10]]
        assert '"requests"' not in str(stats)


def test_a_failing_books_provider_never_stops_commits_and_is_reported(tmp_path):
    import dmi
    from dmi.sinks.base import RunMeta
    from dmi.sinks.hdf5 import HDF5Sink

    b = _books()
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("boom")

    sink = HDF5Sink(str(tmp_path / "x.h5"), flush_every_s=3600)
    sink.stats_provider = lambda: {"interventions": b.snapshot(per_request=False)}
    sink.books_provider = broken
    sink.open(RunMeta(dmi_version=dmi.__version__, engine="test", model="none", model_config={}, spec_json="{}"))
    b.record(0, ["x"], np.array([0]), np.array([0]))
    sink.flush()
    sink.flush()
    sink.close({"interventions": b.snapshot()})
    run = dmi.open(str(tmp_path / "x.h5"))
    assert len(calls) == 1 and run.complete
    assert any("per-request ranges stopped" in e and "boom" in e for e in run.stats["errors"])
    assert run.interventions["a"]["requests"] == {"x": [[0, 1]]}  # no /books: the close's full books


def test_a_close_whose_last_commit_failed_keeps_the_newer_full_books(tmp_path):
    import pytest

    import dmi
    from dmi.sinks.base import RunMeta
    from dmi.sinks.hdf5 import HDF5Sink

    b = _books()
    sink = HDF5Sink(str(tmp_path / "x.h5"), flush_every_s=3600)
    sink.stats_provider = lambda: {"interventions": b.snapshot(per_request=False)}
    sink.books_provider = b.take_changes
    sink.open(RunMeta(dmi_version=dmi.__version__, engine="test", model="none", model_config={}, spec_json="{}"))
    b.record(0, ["x"], np.array([0, 0]), np.array([0, 1]))
    sink.flush()  # /books: x [0, 2)
    b.record(0, ["x"], np.array([0]), np.array([2]))

    def full(*a):
        raise OSError("disk full")

    sink._flush_buffers = full
    with pytest.raises(OSError):
        sink.close({"interventions": b.snapshot()})
    run = dmi.open(str(tmp_path / "x.h5"))
    assert not run.complete
    assert run.interventions["a"]["requests"] == {"x": [[0, 3]]}
