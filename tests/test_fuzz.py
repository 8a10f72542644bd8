"""Property-based tests (hypothesis, bounded and derandomized so CI is fast and repeatable):
random spec dicts give only SpecError naming a field; random damage to an output file gives a
RunFileError naming the file, or reads, and never crashes or hangs the reader (issue 18)."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmi
from dmi.errors import SpecError
from dmi.sinks.base import GapBlock, HookInfo, RowBlock, RunMeta
from dmi.sinks.hdf5 import HDF5Sink
from dmi.spec import CaptureSpec

FAST = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- random specs ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)
ints = st.integers(-3, 2**65) | st.sampled_from([0, 1, 2, 7, 2**63 - 1, 2**63])
floats = st.floats(-1, 2) | st.sampled_from([0.0, 0.25, 0.75, 1.0, float("nan"), float("inf")])
modes = st.sampled_from(["all", "prefill", "decode", "last", "middle", ""])
hook_names = st.sampled_from(["resid", "hook_logits", "blocks.0.hook_resid_post", "blocks.9.hook_resid_post",
                              "blocks.*.attn.hook_q", "blocks.0.attn.hook_pattern", "nope",
                              "module:model.layers.0.mlp", "module:model.nothing", ""])
hooks = st.lists(hook_names, max_size=3) | hook_names | values
tokens = modes | st.fixed_dictionaries({}, optional={
    "mode": modes | values,
    "positions": st.lists(st.lists(ints, max_size=3), max_size=3) | st.none() | values,
    "every": ints | values}) | values
requests = st.fixed_dictionaries({}, optional={
    "ids": st.lists(st.integers(-3, 9) | st.text(max_size=3) | st.booleans() | st.none(), max_size=3) | values,
    "sample": floats | values, "seed": ints, "predicate": st.none() | st.text(max_size=4)}) | values
steps = st.fixed_dictionaries({}, optional={"stride": ints | values, "warmup": ints | values}) | values
ring = ints | st.fixed_dictionaries({}, optional={"bytes": ints | values}) | values
overload = st.sampled_from(["block", "drop", "degrade", "explode"]) | values
degrade = st.none() | st.fixed_dictionaries(
    {"fallback": st.fixed_dictionaries({"hooks": hooks}, optional={"tokens": tokens}) | values},
    optional={"high": floats, "low": floats}) | values
sink = st.sampled_from(["out.h5", "", None, 5]) | st.fixed_dictionaries(
    {"kind": st.sampled_from(["hdf5", "zzz"])}, optional={"path": st.sampled_from(["x.h5", None, 3])}) | values
FIELDS = {"hooks": hooks, "tokens": tokens, "requests": requests, "steps": steps, "ring": ring,
          "overload": overload, "degrade": degrade, "sink": sink}
specs = st.builds(lambda known, extra: {**extra, **known},
                  st.fixed_dictionaries({}, optional=FIELDS), st.dictionaries(st.text(max_size=6), values, max_size=2))


def _names_a_field(e: SpecError, spec: dict) -> None:
    assert isinstance(e.field, str) and e.field, e
    known = e.field == "spec" or e.field.split(".")[0] in CaptureSpec.model_fields
    assert known or e.field in map(str, spec), (e.field, str(e))   # or the unknown key given
    assert str(e).startswith(e.field + ":"), str(e)


@settings(FAST, max_examples=300)
@given(specs)
def test_random_spec_dicts_give_only_spec_errors(spec):
    try:
        parsed = CaptureSpec.parse(spec)
    except SpecError as e:
        _names_a_field(e, spec)
        return
    # what parses must round-trip through the JSON stored in every output file
    assert CaptureSpec.model_validate_json(parsed.to_json()) == parsed
    if parsed.degrade is not None:
        parsed.degrade.fallback.tokens.is_subset_of(parsed.tokens)


# Nearer to what a user writes, so that most reach the engine-side checks of attach.
small = st.integers(0, 40)
user_modes = st.sampled_from(["all", "prefill", "decode", "last"])
user_tokens = user_modes | st.fixed_dictionaries({}, optional={
    "mode": user_modes, "positions": st.lists(st.tuples(small, small), min_size=1, max_size=2),
    "every": st.integers(1, 4)})
good_hooks = st.lists(st.sampled_from(["resid", "hook_logits", "blocks.0.hook_resid_post", "blocks.*.attn.hook_q",
                                        "module:model.layers.0.mlp"]), min_size=1, max_size=3)
user_degrade = st.fixed_dictionaries(
    {"fallback": st.fixed_dictionaries({"hooks": st.lists(hook_names, min_size=1, max_size=2)},
                                       optional={"tokens": user_tokens})},
    optional={"high": st.sampled_from([0.5, 0.75, 1.0]), "low": st.sampled_from([0.0, 0.25, 0.9])})
user_overload = (st.sampled_from([{}, {"overload": "block"}, {"overload": "drop"}])
                 | st.fixed_dictionaries({"overload": st.just("degrade"), "degrade": user_degrade})
                 | st.sampled_from([{"overload": "degrade"}, {"degrade": {"fallback": {"hooks": ["resid"]}}}]))
user_specs = st.builds(lambda base, over: {**base, **over}, st.fixed_dictionaries(
    {"hooks": good_hooks | st.lists(hook_names, min_size=1, max_size=3)}, optional={
        "tokens": user_tokens,
        "requests": st.fixed_dictionaries({}, optional={
            "ids": st.lists(st.integers(0, 3) | st.sampled_from(["0", "x"]), min_size=1, max_size=2),
            "sample": st.sampled_from([0.0, 0.5, 1.0]), "predicate": st.sampled_from(["nope", None])}),
        "steps": st.fixed_dictionaries({}, optional={"stride": st.integers(1, 3), "warmup": st.integers(0, 2)})}),
    user_overload)

OUT = "<out>"  # the test's own folder, filled in per run
attach_sinks = st.sampled_from([f"{OUT}/a.h5"] * 8 + [None, 5, "", f"{OUT}/missing/x.h5", {"kind": "zzz"},
                                {"kind": "hdf5"}])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("attach"))


@settings(FAST, max_examples=60)
@given(spec=user_specs, sink_value=attach_sinks,
       ring_bytes=st.sampled_from([{"bytes": 1 << 20}, {"bytes": 2**50}, None, 64, 1 << 16, 2**63 - 1]))
def test_random_specs_at_attach_give_only_spec_errors(spec, sink_value, ring_bytes, load, out_dir):
    """The same through dmi.attach on a real model: refused with a SpecError naming the field,
    or attached (and detached) cleanly; the model keeps working either way."""
    model = load("qwen3")
    if isinstance(sink_value, str):
        sink_value = sink_value.replace(OUT, out_dir)
    spec = {**spec, "sink": sink_value}
    if ring_bytes is not None:
        spec["ring"] = ring_bytes   # a size that fits, or one far above any machine's memory
    elif isinstance(spec.get("ring"), int) or isinstance(spec.get("ring"), dict):
        spec["ring"] = 1 << 20
    try:
        with dmi.attach(model, spec):
            pass
    except SpecError as e:
        _names_a_field(e, spec)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


# -- damaged files --------------------------------------------------------------------------

WORKER = r"""
import json, sys
import dmi
from dmi.errors import RunFileError
from dmi.reader.summary import summarize

for line in sys.stdin:
    path, salvage = json.loads(line)
    try:
        with dmi.open(path, salvage=salvage) as run:
            rows = {}
            for hook in run.hooks:
                for r in run.requests:
                    got, pos = run.get(hook, r), run.positions(hook, r)
                    assert len(got) == len(pos), (hook, r)
                    if len(got):
                        rows[f"{hook}|{r}"] = [pos.tolist(), got.float().sum(dim=tuple(range(1, got.dim()))).tolist()]
            run.gaps(); run.stats; summarize(run)
            out = {"ok": rows, "requests": run.requests}
    except RunFileError as e:
        out = {"error": str(e), "names_file": path in str(e)}
    except Exception as e:
        out = {"other": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


class Reader:
    """A child process that opens and reads files; a crash or hang there is seen, not suffered."""

    def __init__(self) -> None:
        self.p: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.p is None or self.p.poll() is not None:
            self.p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        return self.p

    def read(self, path: str, salvage: bool, timeout: float = 60.0) -> dict:
        p = self._start()
        p.stdin.write(json.dumps([path, salvage]) + "\n")
        p.stdin.flush()
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        if not ready:
            p.kill()
            p.wait()
            return {"hang": timeout}
        line = p.stdout.readline()
        if not line:
            return {"crash": p.wait()}
        return json.loads(line)

    def close(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def reader():
    r = Reader()
    yield r
    r.close()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "run.h5"
    make_run(path)
    return path   # (not its bytes: hypothesis prints the fixtures of a failing example)


def make_run(path: Path) -> None:
    """A run of two hooks (float32, bfloat16), gaps, 24 requests and a commit every 4 steps;
    rows are wide enough that row data, not HDF5's fixed-size index chunks, fills most of it."""
    a, b = HookInfo("blocks.0.hook_resid_post", "float32", (2048,)), HookInfo("hook_logits", "bfloat16", (1024,))
    sink = HDF5Sink(str(path), chunk_bytes=16 << 10)
    sink.open(RunMeta("0.1.0", "hf", "tiny", {"n": 1}, json.dumps({"hooks": [a.name, b.name]}),
                      extra={"hooks": [a.name, b.name]}))
    rng = np.random.default_rng(0)
    for step in range(24):
        rids = [f"req-{step // 3}-{i}" for i in range(3)]
        pos = np.full(3, step % 3, np.int64)
        sink.write(RowBlock(a, rng.standard_normal((3, 2048), dtype=np.float32), rids, pos, np.full(3, step)))
        sink.write(RowBlock(b, rng.integers(0, 2**14, (3, 1024), dtype=np.uint16), rids, pos, np.full(3, step)))
        sink.write_gaps(GapBlock(b.name, rids[:1], pos[:1] + 100, np.array([step]), "ring_full"))
        if step % 4 == 3:
            sink.flush()
    sink.close({"rows": {"produced": 144}}, complete=True)


def test_the_reader_worker_reads_the_intact_file(reader, original):
    path = original
    got = reader.read(str(path), salvage=False)
    assert set(got) == {"ok", "requests"} and len(got["requests"]) == 24 and len(got["ok"]) == 48, got


@settings(FAST, max_examples=30)
@given(data=st.data())
def test_damaged_files_raise_a_named_error_or_read(data, reader, original, tmp_path_factory):
    path, blob = original, original.read_bytes()
    whole = reader.read(str(path), salvage=False)["ok"]
    kind = data.draw(st.sampled_from(["truncate", "flip"]))
    if kind == "truncate":
        damaged = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        buf = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
        damaged = bytes(buf)
    bad = tmp_path_factory.mktemp("damaged") / "bad.h5"
    bad.write_bytes(damaged)
    for salvage in (False, True):
        got = reader.read(str(bad), salvage=salvage)
        assert "hang" not in got and "crash" not in got and "other" not in got, (kind, salvage, got)
        if "error" in got:
            assert got["names_file"], got["error"]
        elif kind == "truncate":
            # nothing was altered, only cut: every row read back is a row of the whole file
            for key, (pos, sums) in got["ok"].items():
                assert key in whole
                want = dict(zip(*whole[key]))
                assert all(want.get(p) == s for p, s in zip(pos, sums)), key
