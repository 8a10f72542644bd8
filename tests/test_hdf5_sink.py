"""HDF5 sink + reader round trips, with synthetic rows only (no model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dmi.errors import SinkPathError
from dmi.reader import Run, open_run
from dmi.reader.summary import summarize
from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta
from dmi.sinks.hdf5 import HDF5Sink, check_writable

F32 = HookInfo("blocks.0.hook_resid_post", "float32", (8,), source="model.layers.0:output")
BF16 = HookInfo("blocks.10.hook_resid_post", "bfloat16", (4, 3), source="model.layers.10:output")
BF16_2 = HookInfo("blocks.2.hook_resid_post", "bfloat16", (4, 3))
TOPK = HookInfo("blocks.1.mlp.hook_topk_ids", "int64", (2,))
PATTERN = HookInfo("blocks.0.attn.hook_pattern", "float32", (2, 1), ragged=True)
HOOKS = (F32, BF16, BF16_2, TOPK, PATTERN)

# (step, [(request, position), ...]): prefill of a and b, then decode, c joins at step 2.
SCHEDULE: list[tuple[int, list[tuple[str, int]]]] = [
    (0, [("req-a", p) for p in range(5)] + [("req-b", p) for p in range(3)]),
    (1, [("req-a", 5), ("req-b", 3)]),
    (2, [("req-c", p) for p in range(4)] + [("req-a", 6), ("req-b", 4)]),
    (3, [("req-c", 4), ("req-a", 7), ("req-b", 5)]),
    (4, [("req-b", 6), ("req-c", 5)]),
]


def make_meta(**extra) -> RunMeta:
    return RunMeta(dmi_version="0.1.0", engine="hf", model="tiny-test",
                   model_config={"num_hidden_layers": 12, "hidden_size": 8},
                   spec_json=json.dumps({"hooks": ["resid"], "sink": "hdf5"}), extra=extra)


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def make_rows(info: HookInfo, positions: list[int], rng: np.random.Generator) -> np.ndarray:
    n = len(positions)
    if info.ragged:
        width = max(positions) + 1
        data = rng.random((n, *info.row_shape[:-1], width), dtype=np.float32) + 0.5
        for i, p in enumerate(positions):
            data[i, ..., p + 1:] = 0.0   # causal: keys beyond the row's position are exactly 0
        return data
    if info.dtype == "bfloat16":
        return bf16_bits(torch.from_numpy(rng.standard_normal((n, *info.row_shape), dtype=np.float32)))
    if info.dtype == "int64":
        return rng.integers(0, 64, size=(n, *info.row_shape), dtype=np.int64)
    return rng.standard_normal((n, *info.row_shape), dtype=np.float32)


Expected = dict[tuple[str, str], list[tuple[int, int, np.ndarray]]]


def write_schedule(sink: HDF5Sink, seed: int = 0, repeat_schedule: int = 1) -> Expected:
    """Write every hook for every step, rows shuffled within each block; return what was written."""
    rng = np.random.default_rng(seed)
    expected: Expected = defaultdict(list)
    offset = 0
    for _ in range(repeat_schedule):
        for step, rows in SCHEDULE:
            rows = [(r, p + offset) for r, p in rows]
            perm = rng.permutation(len(rows))
            rows = [rows[i] for i in perm]
            for info in HOOKS:
                positions = [p for _, p in rows]
                data = make_rows(info, positions, rng)
                sink.write(RowBlock(hook=info, data=data, request=[r for r, _ in rows],
                                    position=np.array(positions, dtype=np.int64),
                                    step=np.full(len(rows), step + 10 * offset, dtype=np.int64)))
                for i, (r, p) in enumerate(rows):
                    expected[(info.name, r)].append((p, step + 10 * offset, data[i].copy()))
        offset += 100
    return expected


def expected_tensor(info: HookInfo, entries: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    entries = sorted(entries, key=lambda e: e[0])
    if not info.ragged:
        return np.stack([e[2] for e in entries])
    width = max(e[0] for e in entries) + 1
    out = np.zeros((len(entries), *info.row_shape[:-1], width), dtype=np.float32)
    for i, (_, _, row) in enumerate(entries):
        out[i, ..., :row.shape[-1]] = row[..., :width]
    return out


def assert_matches(run: Run, expected: Expected) -> None:
    for (hook, req), entries in expected.items():
        info = next(h for h in HOOKS if h.name == hook)
        got = run.get(hook, req)
        want = expected_tensor(info, entries)
        if info.dtype == "bfloat16":
            assert got.dtype == torch.bfloat16
            # Bit-exact: compare the raw patterns, not float values.
            assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), want)
        else:
            assert got.dtype == getattr(torch, info.dtype)
            assert np.array_equal(got.numpy(), want), (hook, req)
        order = sorted(entries, key=lambda e: e[0])
        assert run.positions(hook, req).tolist() == [e[0] for e in order]
        assert run.steps(hook, req).tolist() == [e[1] for e in order]
        assert run.positions(hook, req).dtype == torch.int64
        assert run.steps(hook, req).dtype == torch.int64


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, Expected]:
    path = tmp_path / "run.h5"
    sink = HDF5Sink(str(path), chunk_bytes=1024)
    sink.open(make_meta(note="hello", tags={"a": [1, 2]}, seed=7))
    expected = write_schedule(sink)
    sink.write_gaps(GapBlock(hook=F32.name, request=["req-c", "req-d"], position=np.array([9, 0]),
                             step=np.array([5, 5]), reason="ring_full"))
    sink.write_gaps(GapBlock(hook="hook_logits", request=["req-a"], position=np.array([8]),
                             step=np.array([5]), reason="oversize"))
    stats = {"hooks": {F32.name: {"produced": 30, "filtered": 0, "written": 28, "dropped": 2},
                       "hook_logits": {"produced": 1, "filtered": 0, "written": 0, "dropped": 1}},
             "elapsed_s": np.float64(1.5), "steps": np.int64(5)}
    sink.close(stats, complete=True)
    return path, expected


def test_roundtrip_values_positions_steps(written: tuple[Path, Expected]) -> None:
    path, expected = written
    with open_run(path) as run:
        assert run.requests == ["req-a", "req-b", "req-c", "req-d"]
        # Natural order: blocks.2 before blocks.10.
        assert run.hooks == ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post",
                             "blocks.1.mlp.hook_topk_ids", "blocks.2.hook_resid_post",
                             "blocks.10.hook_resid_post"]
        assert_matches(run, expected)
        assert run.dtype(BF16.name) == "bfloat16"
        assert run.shape(BF16.name) == (4, 3)
        assert run.shape(TOPK.name) == (2,)
        assert run.nbytes(F32.name) >= run.num_rows(F32.name) * 8 * 4
        assert run.num_rows(F32.name) == sum(len(rows) for _, rows in SCHEDULE)


def test_ragged_trim_and_padding(written: tuple[Path, Expected]) -> None:
    path, _ = written
    with open_run(path) as run:
        # The widest block (step 3 holds position 7) sets the stored width.
        assert run.shape(PATTERN.name) == (2, 8)
        for req, last in (("req-a", 7), ("req-b", 6), ("req-c", 5)):
            pat = run.get(PATTERN.name, req)
            assert pat.shape == (last + 1, 2, last + 1)
            for i, p in enumerate(run.positions(PATTERN.name, req).tolist()):
                assert torch.all(pat[i, :, : p + 1] > 0)
                assert torch.all(pat[i, :, p + 1:] == 0)
    with h5py.File(path, "r") as f:
        data = f["hooks"][PATTERN.name]["data"]
        assert data.maxshape == (None, 2, None)
        # Rows of the first (5-wide) block are zero-padded in the file.
        assert not np.any(data[:8, :, 5:])


def test_plain_h5py_layout(written: tuple[Path, Expected]) -> None:
    path, _ = written
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == "dmi-hdf5" and a["format_version"] == 1
        assert a["dmi_version"] == "0.1.0" and a["engine"] == "hf" and a["model"] == "tiny-test"
        assert json.loads(a["model_config"])["num_hidden_layers"] == 12
        assert json.loads(a["spec"])["sink"] == "hdf5"
        assert bool(a["complete"]) is True
        assert a["note"] == "hello" and a["seed"] == 7 and json.loads(a["tags"]) == {"a": [1, 2]}
        assert list(f["requests"].asstr()[()]) == ["req-a", "req-b", "req-c", "req-d"]
        g = f["hooks"][BF16.name]
        assert g.attrs["dtype"] == "bfloat16" and not g.attrs["ragged"]
        assert list(g.attrs["row_shape"]) == [4, 3]
        assert g.attrs["source"] == "model.layers.10:output"
        assert g["data"].dtype == np.uint16 and g["data"].shape == (21, 4, 3)
        assert g["request"].dtype == np.int32 and g["position"].dtype == np.int64
        assert g["step"].dtype == np.int64
        assert g["data"].chunks is not None and g["data"].maxshape[0] is None
        # First block of the schedule, in the order it was written: prefill rows of a and b.
        first = set(zip(g["request"][:8].tolist(), g["position"][:8].tolist()))
        assert first == {(0, p) for p in range(5)} | {(1, p) for p in range(3)}
        assert f["hooks"][PATTERN.name].attrs["ragged"]
        assert list(f["hooks"][PATTERN.name].attrs["row_shape"]) == [2, 8]
        assert list(f["gaps"]["hook"].asstr()[()]) == [F32.name, F32.name, "hook_logits"]
        assert list(f["gaps"]["request"][()]) == [2, 3, 0]


def test_meta_stats_and_gaps(written: tuple[Path, Expected]) -> None:
    path, _ = written
    with open_run(path) as run:
        meta = run.meta
        assert meta["complete"] is True and run.complete
        assert meta["model_config"] == {"num_hidden_layers": 12, "hidden_size": 8}
        assert meta["tags"] == {"a": [1, 2]} and meta["note"] == "hello"
        assert run.spec == {"hooks": ["resid"], "sink": "hdf5"}
        assert run.stats["hooks"][F32.name]["dropped"] == 2
        assert run.stats["elapsed_s"] == 1.5 and run.stats["steps"] == 5
        assert len(run.gaps()) == 3
        assert run.gaps(hook=F32.name, request="req-d") == [
            {"hook": F32.name, "request": "req-d", "position": 0, "step": 5, "reason": "ring_full"}]
        assert [g["reason"] for g in run.gaps(hook="hook_logits")] == ["oversize"]
        assert run.gaps(request="req-b") == []
        # req-d was only ever dropped: it exists, but has no rows.
        empty = run.get(BF16.name, "req-d")
        assert empty.shape == (0, 4, 3) and empty.dtype == torch.bfloat16
        assert run.positions(F32.name, "req-d").shape == (0,)
        assert "complete" in repr(run) and "requests=4" in repr(run)


def test_unknown_names_suggest_close_ones(written: tuple[Path, Expected]) -> None:
    path, _ = written
    with open_run(path) as run:
        with pytest.raises(KeyError, match=r"blocks\.0\.hook_resid_post"):
            run.get("blocks.0.hook_resid_pst", "req-a")
        with pytest.raises(KeyError, match="req-a"):
            run.get(F32.name, "req_a")
        with pytest.raises(KeyError, match="unknown hook"):
            run.gaps(hook="nonsense")
        with pytest.raises(KeyError, match="unknown request"):
            run.gaps(request="req-z")
        with pytest.raises(KeyError, match="unknown request"):
            run.steps(F32.name, "nope")


def test_complete_false_until_close_and_readable_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "live.h5"
    sink = HDF5Sink(str(path))
    sink.open(make_meta())
    expected = write_schedule(sink)
    sink.flush()
    # Read from another process, as `dmi inspect` would while the server is still capturing.
    code = ("import sys; from dmi.reader import open_run\n"
            "r = open_run(sys.argv[1]); print(r.complete, r.num_rows(sys.argv[2]), len(r.requests))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(path), F32.name], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "21", "3"]
    with open_run(path) as run:   # in-process too, beside the open sink
        assert run.complete is False and run.num_rows(F32.name) == 21
    sink.close({}, complete=True)
    sink.close({"ignored": True})   # idempotent
    with open_run(path) as run:
        # no books were handed to close(); the reader adds what the file holds (committed rows)
        per_hook = {h.name: sum(len(v) for (name, _), v in expected.items() if name == h.name) for h in HOOKS}
        assert run.complete and run.stats == {"hooks": {h: {"committed": n} for h, n in per_hook.items()},
                                              "rows": {"committed": sum(per_hook.values())}}
        assert_matches(run, expected)


def test_close_incomplete_and_write_after_close(tmp_path: Path) -> None:
    path = tmp_path / "crash.h5"
    sink = HDF5Sink(str(path))
    sink.open(make_meta())
    write_schedule(sink)
    sink.close({"error": "engine died"}, complete=False)
    with pytest.raises(RuntimeError):
        sink.write(RowBlock(F32, np.zeros((1, 8), np.float32), ["x"], np.array([0]), np.array([0])))
    with open_run(path) as run:
        assert run.complete is False and run.stats["error"] == "engine died"
        assert run.stats["rows"] == {"committed": 21 * len(HOOKS)}
        assert run.num_rows(F32.name) == 21
        assert "INCOMPLETE" in repr(run)


def test_many_small_blocks_same_as_one_pass(tmp_path: Path) -> None:
    """500 blocks through tiny chunks must give the same file contents as big chunks."""
    small, big = tmp_path / "small.h5", tmp_path / "big.h5"
    results = []
    for path, chunk in ((small, 256), (big, 1 << 22)):
        sink = HDF5Sink(str(path), chunk_bytes=chunk, flush_every_s=3600)
        sink.open(make_meta())
        # 20 schedule rounds x 5 steps x 5 hooks = 500 blocks.
        results.append(write_schedule(sink, seed=3, repeat_schedule=20))
        sink.close({})
    assert results[0].keys() == results[1].keys()
    with open_run(small) as a, open_run(big) as b:
        assert_matches(a, results[0])
        for hook in a.hooks:
            for req in a.requests:
                ta, tb = a.get(hook, req), b.get(hook, req)
                if ta.dtype == torch.bfloat16:
                    ta, tb = ta.view(torch.int16), tb.view(torch.int16)
                assert torch.equal(ta, tb), (hook, req)
        assert a.shape(PATTERN.name) == (2, 1908)   # widest position 1907 + 1
    with h5py.File(small, "r") as f:
        g = f["hooks"][F32.name]
        assert g["data"].chunks[0] == 256 // 32 and g["data"].shape[0] == 21 * 20


def test_big_block_bypasses_buffer_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "big_rows.h5"
    info = HookInfo("hook_logits", "float32", (1000,))
    sink = HDF5Sink(str(path), chunk_bytes=16 << 10)
    sink.open(make_meta())
    rng = np.random.default_rng(1)
    sizes = [1, 2, 30, 1, 1, 50, 3]  # 30 and 50 rows exceed chunk_bytes and are written directly
    written, pos = [], 0
    for step, n in enumerate(sizes):
        data = rng.standard_normal((n, 1000), dtype=np.float32)
        written.append(data.copy())
        sink.write(RowBlock(info, data, ["r"] * n, np.arange(pos, pos + n), np.full(n, step)))
        pos += n
    sink.close({})
    with open_run(path) as run:
        got = run.get("hook_logits", "r")
        assert np.array_equal(got.numpy(), np.concatenate(written))
        assert run.positions("hook_logits", "r").tolist() == list(range(sum(sizes)))
        assert run.steps("hook_logits", "r").tolist() == [s for s, n in enumerate(sizes) for _ in range(n)]


def test_blocks_are_handed_over_without_a_copy(tmp_path: Path) -> None:
    """A block is handed over (the drain never reuses it): the sink keeps small blocks by
    reference until their append, so the drain's copy out of the ring is the only host copy."""
    path = tmp_path / "copy.h5"
    sink = HDF5Sink(str(path), chunk_bytes=1 << 20)
    sink.open(make_meta())
    buf = np.arange(16, dtype=np.float32).reshape(2, 8)
    sink.write(RowBlock(F32, buf, ["r", "r"], np.array([0, 1]), np.array([0, 0])))
    buf[:] = -1   # visible in the file: the sink held the caller's array, not a copy
    sink.close({})
    assert sink.copied_bytes == 0
    with open_run(path) as run:
        assert run.get(F32.name, "r").flatten().tolist() == [-1.0] * 16


def test_rows_are_committed_only_by_flush(tmp_path: Path) -> None:
    """write() never commits (the drain flushes between whole steps, every flush_every_s), so a
    reader never sees a step torn across hooks."""
    path = tmp_path / "timed.h5"
    sink = HDF5Sink(str(path), chunk_bytes=1 << 24, flush_every_s=0.0)
    sink.open(make_meta())
    sink.write(RowBlock(F32, np.ones((3, 8), np.float32), ["r"] * 3, np.arange(3), np.zeros(3)))
    with open_run(path) as run:
        assert F32.name not in run.hooks or run.num_rows(F32.name) == 0
    sink.flush()
    with open_run(path) as run:
        assert run.num_rows(F32.name) == 3
        assert run.requests == ["r"]
    sink.close({})


def test_duplicate_positions_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "dup.h5"
    sink = HDF5Sink(str(path))
    sink.open(make_meta())
    sink.write(RowBlock(F32, np.full((2, 8), 1.0, np.float32), ["r", "r"], np.array([1, 0]), np.array([0, 0])))
    sink.write(RowBlock(F32, np.full((1, 8), 2.0, np.float32), ["r"], np.array([1]), np.array([1])))
    sink.close({})
    with open_run(path) as run:
        assert run.positions(F32.name, "r").tolist() == [0, 1, 1]
        assert run.steps(F32.name, "r").tolist() == [0, 0, 1]
        assert run.get(F32.name, "r")[:, 0].tolist() == [1.0, 1.0, 2.0]


def test_inconsistent_blocks_rejected(tmp_path: Path) -> None:
    sink = HDF5Sink(str(tmp_path / "bad.h5"))
    sink.open(make_meta())
    sink.write(RowBlock(F32, np.zeros((1, 8), np.float32), ["r"], np.array([0]), np.array([0])))
    with pytest.raises(ValueError, match="dtype"):
        sink.write(RowBlock(F32, np.zeros((1, 8), np.float64), ["r"], np.array([1]), np.array([1])))
    with pytest.raises(ValueError, match="row shape"):
        sink.write(RowBlock(F32, np.zeros((1, 9), np.float32), ["r"], np.array([1]), np.array([1])))
    with pytest.raises(ValueError, match="request ids"):
        sink.write(RowBlock(F32, np.zeros((2, 8), np.float32), ["r"], np.array([1, 2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="bit patterns"):
        sink.write(RowBlock(BF16, np.zeros((1, 4, 3), np.float32), ["r"], np.array([0]), np.array([0])))
    sink.close({})


def test_unwritable_paths(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "out.h5"
    with pytest.raises(SinkPathError, match="does not exist") as exc:
        check_writable(str(missing))
    assert isinstance(exc.value, ValueError) and str(missing) in str(exc.value)
    with pytest.raises(ValueError, match="directory"):
        HDF5Sink(str(tmp_path)).open(make_meta())
    with pytest.raises(SinkPathError, match="does not exist"):
        HDF5Sink.check_writable(missing)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SinkPathError, match="not a folder"):
        check_writable(str(blocker / "out.h5"))
    check_writable(str(tmp_path / "fine.h5"))
    if os.geteuid() != 0:   # root can write anywhere, so permissions cannot be tested as root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(SinkPathError, match="not writable"):
                HDF5Sink(str(ro / "out.h5")).open(make_meta())
        finally:
            ro.chmod(0o700)


def test_reserved_extra_keys_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        HDF5Sink(str(tmp_path / "x.h5")).open(make_meta(model="other"))


def test_open_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        open_run(tmp_path / "nope.h5")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not a dmi run"):
        open_run(plain)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        open_run(text)


def test_summary(written: tuple[Path, Expected], tmp_path: Path) -> None:
    path, _ = written
    with open_run(path) as run:
        text = summarize(run)
    assert "complete" in text and "INCOMPLETE" not in text
    assert "tiny-test" in text and "requests:  4" in text and "req-a" in text
    for info in HOOKS:
        assert info.name in text
    assert "ring_full=2" in text and "dropped rows: 3 (stats), 3 (gaps)" in text
    assert "n=21" in text   # integer hook: count only

    # Known norms: every row of layer L is all (L+1)s over 4 dims -> norm 2(L+1).
    p2 = tmp_path / "norms.h5"
    sink = HDF5Sink(str(p2))
    sink.open(make_meta())
    for layer in (0, 1, 2, 10):
        info = HookInfo(f"blocks.{layer}.hook_resid_post", "bfloat16", (4,))
        rows = bf16_bits(torch.full((5000, 4), float(layer + 1)))
        sink.write(RowBlock(info, rows, ["r"] * 5000, np.arange(5000), np.zeros(5000)))
    sink.write(RowBlock(HookInfo("hook_embed", "float32", (3,)), np.full((2, 3), 2.0, np.float32),
                        ["r", "r"], np.arange(2), np.zeros(2)))
    logits = np.full((3, 4), 1.0, np.float32)
    logits[1, 2] = np.inf
    sink.write(RowBlock(HookInfo("hook_logits", "float32", (4,)), logits, ["r"] * 3, np.arange(3), np.zeros(3)))
    sink.close({})
    with open_run(p2) as run:
        text = summarize(run)
    lines = text.splitlines()
    layer_rows = [ln.split() for ln in lines if ln.strip().split()[:1] in (["0"], ["1"], ["2"], ["10"])]
    assert [r[0] for r in layer_rows] == ["0", "1", "2", "10"]
    assert [float(r[1]) for r in layer_rows] == [2.0, 4.0, 6.0, 22.0]
    assert any(ln.split() == ["hook_embed", "3.464"] for ln in lines)
    # A row with inf is counted apart instead of turning the mean into inf.
    assert any(ln.split() == ["hook_logits", "2.000", "(1", "nan/inf)"] for ln in lines)


def test_blocks_gathered_into_staging_are_written_exactly(tmp_path):
    """The drain gathers blocks into the sink's staging buffers (adjacent slices, written as one
    array); interleaved hooks, a bf16 hook (uint16 views of the buffer), a timed flush between
    slices of one buffer, and a block larger than a buffer all read back exactly."""
    path = tmp_path / "staged.h5"
    sink = HDF5Sink(str(path), chunk_bytes=256)
    sink.open(make_meta())
    rng = np.random.default_rng(3)
    expected: dict[str, list] = defaultdict(list)
    for step in range(12):
        for info, dtype in ((F32, np.float32), (BF16, np.uint16)):
            n = 40 if step == 7 else 1 + step % 3   # step 7: more rows than one staging buffer
            rows = (rng.standard_normal((n, *info.row_shape)).astype(np.float32) if dtype == np.float32
                    else rng.integers(0, 2**16, (n, *info.row_shape), dtype=np.uint16))
            out = sink.staging(info, n, rows.shape[1:], rows.dtype)
            np.copyto(out, rows)
            sink.write(RowBlock(info, out, request=["r"] * n, position=np.arange(n) + 100 * step,
                                step=np.full(n, step)))
            expected[info.name].append(rows)
        if step == 4:
            sink.flush()
    sink.close({}, complete=True)
    run = open_run(str(path))
    assert np.array_equal(run.get(F32.name, "r"), np.concatenate(expected[F32.name]))
    got = run.get(BF16.name, "r")
    want = torch.from_numpy(np.concatenate(expected[BF16.name]).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(torch.as_tensor(got).view(torch.int16), want.view(torch.int16))


def test_close_commits_again_only_what_is_new(tmp_path: Path) -> None:
    """The drain commits at its stop marker just before close(): close adds a commit only when
    something came after it, and either way the file ends complete with every row."""
    for late in (False, True):
        path = tmp_path / f"close-{late}.h5"
        sink = HDF5Sink(str(path), chunk_bytes=1 << 24)
        sink.open(make_meta())
        sink.write(RowBlock(F32, np.ones((3, 8), np.float32), ["r"] * 3, np.arange(3), np.zeros(3)))
        sink.flush()
        if late:
            sink.write(RowBlock(F32, np.full((2, 8), 2.0, np.float32), ["s"] * 2, np.arange(2), np.ones(2)))
        sink.close({"rows": 5 if late else 3})
        with h5py.File(path, "r") as f:
            assert f.attrs["complete"] and f.attrs["commits"] == (3 if late else 2)  # open, flush[, close]
            g = f["hooks"][F32.name]
            n = 5 if late else 3
            assert g.attrs["committed"] == n and g["data"].shape == (n, 8)
            assert f.attrs["committed_requests"] == (2 if late else 1)
        with open_run(path) as run:
            assert run.requests == (["r", "s"] if late else ["r"])
            assert torch.equal(run.get(F32.name, "r"), torch.ones(3, 8))
            if late:
                assert torch.equal(run.get(F32.name, "s"), torch.full((2, 8), 2.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16, np.int64, np.int32, np.bool_])
def test_low_level_appends_equal_h5py_slicing(tmp_path: Path, dtype) -> None:
    """h5append's set_extent and hyperslab writes give what h5py's resize and slice assignment
    give, for every dtype a hook stores, multi-dim rows, and strided (non-contiguous) input."""
    from dmi.sinks import h5append

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((7, 3, 4)) * 50).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        a = f.create_dataset("a", shape=(0, 3, 4), maxshape=(None, 3, 4), dtype=dtype, chunks=(4, 3, 4))
        b = f.create_dataset("b", shape=(0, 3, 4), maxshape=(None, 3, 4), dtype=dtype, chunks=(4, 3, 4))
        at = 0
        for part in (rows[:2], rows[2:3], rows[3:][::-1][::-1], rows[::2][1:3]):  # the last is strided
            h5append.grow(a, at + len(part))
            h5append.put(a, at, part)
            b.resize(at + len(part), axis=0)
            b[at:at + len(part)] = part
            at += len(part)
        assert a.shape == b.shape == (at, 3, 4)
        assert a.dtype == b.dtype and np.array_equal(a[:], b[:])
        h5append.set_int(a, "committed", 5)
        h5append.set_int(a, "committed", 6)  # overwritten in place
        assert a.attrs["committed"] == 6
