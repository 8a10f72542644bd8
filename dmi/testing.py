"""Conformance kit for adapter plugins: run it against your adapter in your own tests.

    from dmi.testing import ConformanceCase, run_conformance

    def test_my_adapter(tmp_path):
        run_conformance(ConformanceCase(make_engine=..., generate=..., reference=..., hooks=[...]), tmp_path)

It checks what every adapter must guarantee (docs/plugins.md): rows attributed to the right
request at the right position and equal to an independent reference, padding never recorded,
everything flushed when the session closes with the books balanced, capture never changing
what the engine computes, detach restoring the engine exactly, and bad input refused at attach
with the engine untouched. Each check raises AssertionError saying what broke.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Callable

import torch

import dmi
from dmi.errors import SessionStateError

DEFAULT_PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37, 38, 39], [41, 42],
                   [51, 52, 53, 54]]


@dataclass
class ConformanceCase:
    make_engine: Callable[[], Any]
    """A fresh engine; the kit makes one and reuses it for every check."""
    generate: Callable[[Any, list[list[int]], int], dict[str, list[int]]]
    """Run the prompts (token ids) through the engine's own serving path for max_new_tokens each and
    return {request id, as dmi records it: the tokens the engine computed for that request, in
    position order} (the prompt, then the generated tokens it fed back)."""
    reference: Callable[[Any, list[int]], dict[str, torch.Tensor]]
    """An oracle independent of the adapter: for one unpadded sequence, {hook: tensor [len(seq), ...]}."""
    hooks: list[str]
    """Hook names, globs or presets; the kit resolves them through your adapter, and the reference
    must compute every name they resolve to."""
    partial_hooks: frozenset[str] = frozenset()
    """Hooks that legitimately cover only some positions (logits in engines that compute them for
    sampled rows only); their values are still checked where present."""
    fingerprint: Callable[[Any], Any] | None = None
    """What must be equal before attach and after detach (default: module_fingerprint: the hooks and
    attributes of every nn.Module the engine holds, and the members of its list/dict/set attributes,
    such as listener lists)."""
    prompts: list[list[int]] = field(default_factory=lambda: [list(p) for p in DEFAULT_PROMPTS])
    max_new_tokens: int = 4
    tol: float = 1e-4


def run_conformance(case: ConformanceCase, workdir: str | Path) -> dict:
    """Run every check; returns a small report ({check: "ok"}) or raises AssertionError."""
    workdir = Path(workdir)
    engine = case.make_engine()
    fingerprint = case.fingerprint or module_fingerprint
    from dmi import plugins

    hooks = plugins.adapter_for(engine).resolve(case.hooks)
    case = _replace(case, hooks=hooks)
    report = {}
    before = fingerprint(engine)
    plain = case.generate(engine, case.prompts, case.max_new_tokens)

    out = str(workdir / "conformance.h5")
    with dmi.attach(engine, dmi.CaptureSpec(hooks=case.hooks, sink=out)) as session:
        try:
            dmi.attach(engine, dmi.CaptureSpec(hooks=case.hooks, sink=str(workdir / "second.h5")))
        except SessionStateError:
            report["second_session_refused"] = "ok"
        else:
            raise AssertionError("a second session on an engine that already has one was not refused")
        captured = case.generate(engine, case.prompts, case.max_new_tokens)
    assert captured == plain, "capture changed what the engine computed (tokens differ with capture on)"
    report["capture_changes_nothing"] = "ok"
    assert fingerprint(engine) == before, "detach did not restore the engine exactly"
    report["detach_restores"] = "ok"

    run = dmi.open(out)
    assert run.complete, "the file is not marked complete after the session closed"
    _check_books(session.stats())
    report["flush_and_books"] = "ok"
    _check_attribution(case, engine, run, captured)
    report["attribution"] = "ok"

    try:
        dmi.attach(engine, dmi.CaptureSpec(hooks=["blocks.0.hook_no_such_hook"], sink=str(workdir / "bad.h5")))
    except ValueError:
        report["bad_input_refused"] = "ok"
    else:
        raise AssertionError("an unknown hook name was accepted at attach")
    assert fingerprint(engine) == before, "a refused attach left traces in the engine"
    assert case.generate(engine, case.prompts, case.max_new_tokens) == plain, "engine broken after a refused attach"
    gc.collect()
    return report


def _check_books(stats: dict) -> None:
    for hook, c in stats["hooks"].items():
        assert c["in_flight"] == 0, f"{hook}: {c['in_flight']} rows still in flight after close"
        assert c["produced"] == c["filtered"] + c["written"] + c["dropped"], f"{hook}: books do not balance: {c}"
        assert c["dropped"] == 0, f"{hook}: {c['dropped']} rows dropped under the lossless 'block' policy"


def _check_attribution(case: ConformanceCase, engine, run, captured: dict[str, list[int]]) -> None:
    assert sorted(run.requests) == sorted(captured), (
        f"request ids in the file {run.requests} are not the engine's {sorted(captured)}")
    for rid, seq in captured.items():
        ref = case.reference(engine, seq)
        for hook in case.hooks:
            pos = run.positions(hook, rid)
            if hook in case.partial_hooks:
                assert len(pos) and int(pos.max()) < len(seq), f"{hook} request {rid}: positions {pos.tolist()}"
            else:
                assert pos.tolist() == list(range(len(seq))), (
                    f"{hook} request {rid}: positions {pos.tolist()}, expected 0..{len(seq) - 1} "
                    f"(padding recorded, or rows missing or misattributed)")
            got = run.get(hook, rid).float()
            exp = ref[hook][pos].float()
            assert got.shape == exp.shape, f"{hook} request {rid}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
            err = (got - exp).abs().max().item() if got.numel() else 0.0
            assert err < case.tol, f"{hook} request {rid}: max abs error {err} against the reference"


def module_fingerprint(engine) -> Any:
    """Hooks, attribute names and parameter versions of every nn.Module reachable from the engine."""
    modules = []
    seen = set()

    def visit(obj, depth=0):
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            modules.append(obj)
            return
        for v in getattr(obj, "__dict__", {}).values():
            if isinstance(v, torch.nn.Module) or hasattr(v, "__dict__") and not isinstance(v, type):
                visit(v, depth + 1)

    visit(engine)
    out = [sorted(getattr(engine, "__dict__", {}))]
    # members of container attributes (listener lists, callback dicts) must come back too
    for key, value in sorted(getattr(engine, "__dict__", {}).items()):
        if isinstance(value, (list, tuple, set, frozenset)):
            out.append((key, sorted(id(v) for v in value)))
        elif isinstance(value, dict):
            out.append((key, sorted(map(repr, value)), sorted(id(v) for v in value.values())))
    for root in modules:
        for name, m in root.named_modules():
            out.append((name, sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks)))
        out.append([p.data_ptr() for p in root.parameters()])
    return out


# -- sinks ---------------------------------------------------------------------------------

def sink_test_blocks(seed: int = 0):
    """Row blocks covering what a sink must keep exactly: float32, bf16 (as uint16 bit patterns),
    int64, a ragged hook whose width grows, several requests interleaved over steps, positions
    out of order; and a gap block."""
    import numpy as np

    from dmi.sinks.base import GapBlock, HookInfo, RowBlock

    g = torch.Generator().manual_seed(seed)
    infos = {
        "blocks.0.hook_resid_post": HookInfo("blocks.0.hook_resid_post", "float32", (8,)),
        "blocks.0.attn.hook_q": HookInfo("blocks.0.attn.hook_q", "bfloat16", (2, 4)),
        "blocks.0.mlp.hook_topk_ids": HookInfo("blocks.0.mlp.hook_topk_ids", "int64", (2,)),
        "blocks.0.attn.hook_pattern": HookInfo("blocks.0.attn.hook_pattern", "float32", (2, 1), ragged=True),
    }
    blocks = []
    for step in range(6):
        reqs = ["a", "b", "c"] if step < 3 else ["c", "a"]
        positions = np.array([step + 3 * i for i in range(len(reqs))][::-1], dtype=np.int64)
        n = len(reqs)
        for name, info in infos.items():
            if info.dtype == "float32" and not info.ragged:
                data = torch.randn(n, 8, generator=g).numpy()
            elif info.dtype == "bfloat16":
                data = torch.randn(n, 2, 4, generator=g).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            elif info.dtype == "int64":
                data = torch.randint(0, 100, (n, 2), generator=g).numpy()
            else:
                width = int(positions.max()) + 1
                data = np.zeros((n, 2, width), dtype=np.float32)
                for i, p in enumerate(positions):
                    data[i, :, : p + 1] = torch.rand(2, int(p) + 1, generator=g).numpy()
            blocks.append(RowBlock(info, data, list(reqs), positions.copy(), np.full(n, step, dtype=np.int64)))
    gaps = GapBlock("blocks.0.hook_resid_post", ["b", "b"], np.array([40, 41]), np.array([9, 10]), "ring_full")
    return blocks, [gaps]


def run_sink_conformance(make_sink: Callable[[Path], Any], read_back: Callable[[Path], dict], workdir) -> None:
    """Write the test blocks through make_sink(workdir), then compare read_back(workdir) with them.

    read_back returns {"rows": {hook: {(request, position): (step, torch tensor row)}},
                       "gaps": [(hook, request, position, step, reason), ...]}; rows of ragged hooks
    may be zero-padded beyond their width. Values must match bit for bit.
    """
    from dmi.sinks.base import RunMeta

    workdir = Path(workdir)
    blocks, gaps = sink_test_blocks()
    sink = make_sink(workdir)
    sink.open(RunMeta(dmi_version=dmi.__version__, engine="conformance", model="none", model_config={},
                      spec_json=dmi.CaptureSpec().to_json()))
    for b in blocks:
        sink.write(b)
    for gblock in gaps:
        sink.write_gaps(gblock)
    sink.flush()
    sink.close({"hooks": {}}, complete=True)
    sink.close({"hooks": {}}, complete=True)  # idempotent
    got = read_back(workdir)
    expected: dict = {}
    for b in blocks:
        rows = torch.from_numpy(b.data)
        if b.hook.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)
        for i, (r, p) in enumerate(zip(b.request, b.position.tolist())):
            expected.setdefault(b.hook.name, {})[(r, p)] = (int(b.step[i]), rows[i])
    assert set(got["rows"]) == set(expected), f"hooks read back {sorted(got['rows'])} != {sorted(expected)}"
    for hook, rows in expected.items():
        assert set(got["rows"][hook]) == set(rows), f"{hook}: (request, position) keys differ"
        for key, (step, row) in rows.items():
            gstep, grow = got["rows"][hook][key]
            assert gstep == step, f"{hook} {key}: step {gstep} != {step}"
            assert grow.dtype == row.dtype, f"{hook}: dtype {grow.dtype} != {row.dtype}"
            # ragged rows: compare the common width; beyond it both sides must be zero padding
            w = min(row.shape[-1], grow.shape[-1])
            assert torch.equal(grow[..., :w], row[..., :w]), f"{hook} {key}: values differ"
            assert not grow[..., w:].any() and not row[..., w:].any(), f"{hook} {key}: row cut or padding not zero"
    want_gaps = sorted((g.hook, r, int(p), int(s), g.reason) for g in gaps
                       for r, p, s in zip(g.request, g.position, g.step))
    assert sorted(got["gaps"]) == want_gaps, f"gaps {sorted(got['gaps'])} != {want_gaps}"


def hdf5_read_back(path: Path) -> dict:
    """read_back for sinks that write dmi's HDF5 format (or any path dmi.open reads)."""
    return run_read_back(dmi.open(path))


def run_read_back(run) -> dict:
    """read_back of any reader with the Run API (a file, a dataset, a memory sink's run())."""
    rows: dict = {}
    for hook in run.hooks:
        for r in run.requests:
            data, pos, steps = run.get(hook, r), run.positions(hook, r), run.steps(hook, r)
            for i in range(len(pos)):
                rows.setdefault(hook, {})[(r, int(pos[i]))] = (int(steps[i]), data[i])
    gaps = [(g["hook"], g["request"], int(g["position"]), int(g["step"]), g["reason"]) for g in run.gaps()]
    return {"rows": rows, "gaps": gaps}
