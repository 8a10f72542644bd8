"""GPU check: every claim of the capture path that only a GPU can show, in one report.

1. kernel: exact bytes from the plan-driven Triton kernel (every dtype, a non-contiguous input,
   a ring past 2 GiB written at an offset past 2^31), status words, shape mismatch writes nothing;
2. CUDA graphs: HF static-cache generate (transformers compiles the decode step with CUDA
   graphs) over batches of different sizes, every row checked against an eager run, across 10
   attach/detach cycles, with inductor's cudagraph skip counter at 0 (graphs really replayed);
3. graph break: an attention-pattern hook under transformers' default CompileConfig, under a
   timeout: refused or recorded, never a hang;
4. races: a 1-4 MiB ring and a wrapping upload ring with the GPU made to lag: rows exact, books
   balanced;
5. no sync: no compute-stream synchronisation in the hot path (sync debug mode "error"), ring
   memory fixed;
6. interventions: per-request edits under CUDA graphs equal eager (tokens, rows, books), with
   the unsteered requests untouched;
7. timing: a small matrix (Qwen3-4B shape, batch 1/16/64, decode 16/128; off, dmi, graphs,
   HF output_hidden_states + .cpu()), and the drain's MB/s against pinned device-to-host MB/s.
Each section runs under its own time budget and reports pass, fail or not run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS: list[tuple[str, str, str]] = []


def link(where: str) -> None:
    """A dmi package tree importable without installing (folders mapped as pyproject's package-dir)."""
    os.makedirs(os.path.join(where, "dmi"), exist_ok=True)
    for name in os.listdir(os.path.join(ROOT, "dmi")):
        dst = os.path.join(where, "dmi", name)
        if not os.path.lexists(dst):
            os.symlink(os.path.join(ROOT, "dmi", name), dst)
    for pkg in ("adapters", "kernels", "policies"):
        dst = os.path.join(where, "dmi", pkg)
        if not os.path.lexists(dst):
            os.symlink(os.path.join(ROOT, pkg), dst)
    mb = os.path.join(where, "matrix_bench")
    if not os.path.lexists(mb):
        os.symlink(os.path.join(ROOT, "matrix_bench"), mb)


def section(name: str, budget_s: float):
    def wrap(fn):
        def run():
            box: dict = {}

            def target():
                try:
                    box["detail"] = fn() or "ok"
                except Exception as e:  # noqa: BLE001  (reported, the next section runs)
                    box["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"

            t0 = time.monotonic()
            th = threading.Thread(target=target, daemon=True)
            th.start()
            th.join(budget_s)
            took = f"{time.monotonic() - t0:.0f} s"
            if th.is_alive():
                RESULTS.append((name, "FAIL (timeout)", f"still running after {budget_s:.0f} s"))
            elif "error" in box:
                RESULTS.append((name, "FAIL", box["error"]))
            else:
                RESULTS.append((name, f"pass ({took})", str(box["detail"])))
        run.__name__ = name
        return run
    return wrap


def tiny_model(dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    from dmi.tiny import build_tiny_model

    path = build_tiny_model("qwen3", tempfile.mkdtemp(prefix="dmi-gpu-"))
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).cuda().eval()
    with torch.no_grad():  # random norm weights: a tap on the wrong side of a norm shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.3)
    return m


@section("kernel: exact bytes, >2 GiB ring, non-contiguous input, status words", 90)
def check_kernel():
    import torch

    from dmi.kernels.capture_op import CTRL_WIDTH, capture, capture_reference, plan_row

    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8):
        for rows, width, strided in ((1, 7, False), (5, 4096, False), (64, 2560, True), (3, 151936, False)):
            base = (torch.randn(rows, width + (5 if strided else 0), device="cuda") * 50).to(dtype)
            x = base[:, :width] if strided else base
            keep = list(range(0, rows, 2)) or [0]
            row_bytes = width * x.element_size()
            ring = torch.zeros(64 + len(keep) * row_bytes + 64, dtype=torch.uint8, device="cuda")
            ctrl = torch.tensor([plan_row(64, len(keep), 0, rows, row_bytes, 0)], dtype=torch.int64, device="cuda")
            plan = torch.tensor([keep], dtype=torch.int64, device="cuda")
            capture(ring, x, plan, ctrl, 0)
            want = torch.zeros_like(ring).cpu()
            capture_reference(want, x.cpu(), torch.tensor(keep), 64)
            want[:8] = torch.tensor([len(keep)], dtype=torch.int64).view(torch.uint8)
            assert torch.equal(ring.cpu(), want), (dtype, rows, width, strided)
            bad = ctrl.clone()
            bad[0, 4] += 1  # planned for another row count: nothing written
            ring.zero_()
            capture(ring, x, plan, bad, 0)
            assert int(ring.count_nonzero()) == 0
            checked += 1
    big = torch.zeros(2**31 + 2**22, dtype=torch.uint8, device="cuda")
    x = torch.randn(4, 1024, device="cuda")
    off = 2**31 + 4096
    ctrl = torch.tensor([plan_row(off, 4, 0, 4, 4096, 2**31)], dtype=torch.int64, device="cuda")
    capture(big, x, torch.tensor([[3, 2, 1, 0]], device="cuda"), ctrl, 0)
    got = big[off: off + 4 * 4096].view(torch.float32).view(4, 1024)
    assert torch.equal(got, x.flip(0)) and int(big[2**31: 2**31 + 8].view(torch.int64)) == 4
    del big
    assert CTRL_WIDTH == 7
    return f"{checked} layouts exact; 2 GiB+ ring at offset 2^31+4096 exact"


def _generate(model, ids, mask, static: bool):
    import torch
    from transformers import CompileConfig

    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=-1)
    if static:
        kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
    with torch.no_grad():
        return model.generate(**kw)


@section("CUDA graphs: static-cache generate exact over batches and 10 attach/detach cycles", 240)
def check_graphs():
    import torch
    from torch._dynamo.utils import counters

    import dmi

    model = tiny_model()
    hooks = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_q", "hook_logits"]
    tmp = tempfile.mkdtemp()
    cycles = []
    for cycle in range(10):
        for b in (1, 3, 8):
            ids = torch.randint(1, 200, (b, 6), device="cuda")
            mask = torch.ones_like(ids)
            mask[0, :2] = 0
            e_path, g_path = f"{tmp}/e{cycle}_{b}.h5", f"{tmp}/g{cycle}_{b}.h5"
            with dmi.attach(model, {"hooks": hooks, "sink": e_path}):
                out_e = _generate(model, ids, mask, static=False)
            with dmi.attach(model, {"hooks": hooks, "sink": g_path}) as s:
                out_g = _generate(model, ids, mask, static=True)
                s.flush()
                stats = s.stats()
            assert torch.equal(out_e, out_g), "greedy tokens differ under graphs"
            e, g = dmi.open(e_path), dmi.open(g_path)
            assert e.requests == g.requests and not g.gaps(), g.gaps()
            for h in e.hooks:
                for r in e.requests:
                    assert torch.equal(e.positions(h, r), g.positions(h, r)), (h, r)
                    err = (e.get(h, r).float() - g.get(h, r).float()).abs().max().item()
                    assert err < 1e-3, (h, r, err)
            assert stats["rows"]["dropped"] == 0
        cycles.append(cycle)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, f"inductor skipped CUDA graphs {skips} times: {dict(counters['inductor'])}"
    graphs = counters["stats"]["unique_graphs"]
    return f"{len(cycles)} cycles x 3 batch sizes exact; cudagraph_skips=0; unique graphs {graphs}"


@section("interventions under CUDA graphs: per-request edits replayed with each step's table", 180)
def check_interventions():
    import torch
    from torch._dynamo.utils import counters

    import dmi

    model = tiny_model()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    hooks = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"]
    tmp = tempfile.mkdtemp()
    done = []
    for b in (2, 5):
        ivs = [{"hook": "blocks.0.hook_resid_post", "op": "add", "value": torch.randn(cfg.hidden_size, generator=g).tolist(),
                "scale": 2.0, "requests": {"ids": [str(r) for r in range(0, b, 2)]}, "tokens": "decode"},
               {"hook": "blocks.0.attn.hook_z", "op": "zero", "heads": [1], "requests": {"ids": ["1"]}}]
        ids = torch.randint(1, 200, (b, 6), device="cuda")
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        runs = {}
        for name, static, spec_ivs in (("eager", False, ivs), ("graphs", True, ivs), ("plain", True, [])):
            path = f"{tmp}/{name}{b}.h5"
            with dmi.attach(model, {"hooks": hooks, "sink": path, "interventions": spec_ivs}) as s:
                out = _generate(model, ids, mask, static=static)
                s.flush()
                runs[name] = (out, dmi.open(path), s.stats())
        (out_e, e, st_e), (out_g, gr, st_g), (out_p, plain, _) = runs["eager"], runs["graphs"], runs["plain"]
        assert torch.equal(out_e, out_g), "steered greedy tokens differ under graphs"
        assert st_g["interventions"] == st_e["interventions"], (st_g["interventions"], st_e["interventions"])
        assert all(v["failed_rows"] == 0 and v["rows"] > 0 for v in st_g["interventions"].values())
        for h in e.hooks:
            for r in e.requests:
                err = (e.get(h, r).float() - gr.get(h, r).float()).abs().max().item()
                assert err < 1e-3, (h, r, err)
        steered = {str(r) for r in range(0, b, 2)} | {"1"}
        for r in set(plain.requests) - steered:
            assert torch.equal(out_p[int(r)], out_g[int(r)]), f"unsteered request {r} changed"
        done.append(b)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, f"inductor skipped CUDA graphs {skips} times"
    return f"batches {done}: graphs == eager (tokens, rows within 1e-3, books); unsteered rows untouched; skips 0"


@section("graph break: pattern hook under the default CompileConfig (refused or recorded)", 120)
def check_graph_break():
    import torch
    from transformers import CompileConfig

    import dmi

    model = tiny_model()
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 200, (2, 5), device="cuda")
    path = tempfile.mktemp(suffix=".h5")
    try:
        with dmi.attach(model, {"hooks": ["blocks.0.attn.hook_pattern", "blocks.*.hook_resid_post"],
                                "sink": path}) as s:
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=-1,
                               cache_implementation="static", compile_config=CompileConfig())
            s.flush()
            stats = s.stats()
    except Exception as e:  # noqa: BLE001
        assert "dmi" in str(e), e
        return f"refused: {str(e)[:200]}"
    for c in stats["hooks"].values():
        assert c["produced"] == c["filtered"] + c["written"] + c["dropped"] and c["in_flight"] == 0
    return f"recorded: drop reasons {stats['drop_reasons']}"


@section("races: 1-4 MiB rings, wrapping upload ring, a lagging GPU", 150)
def check_races():
    import torch

    import dmi
    from dmi.plan import control

    model = tiny_model()
    hooks = ["blocks.*.hook_resid_post", "hook_logits"]
    tmp = tempfile.mkdtemp()
    lag = model.model.layers[0].register_forward_hook(lambda m, a, o: torch.cuda._sleep(2_000_000))
    try:
        for ring in (1 << 20, 4 << 20):
            ids = torch.randint(1, 200, (4, 9), device="cuda")
            n_hooks = len(model.model.layers) + 1
            control.ControlTable.upload_entries = 3 * (n_hooks * 7 + 2 * control.ROW_CAPACITY)  # wraps every 3 steps
            with dmi.attach(model, {"hooks": hooks, "ring": {"bytes": ring}, "sink": f"{tmp}/r{ring}.h5"}) as s:
                for _ in range(3):
                    with torch.no_grad():
                        model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                       eos_token_id=-1)
                s.flush()
                stats = s.stats()
            assert stats["rows"]["dropped"] == 0 and stats["rows"]["in_flight"] == 0, stats["rows"]
            lag.remove()
            with dmi.attach(model, {"hooks": hooks, "sink": f"{tmp}/ref{ring}.h5"}):
                for _ in range(3):
                    with torch.no_grad():
                        model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                       eos_token_id=-1)
            a, b = dmi.open(f"{tmp}/r{ring}.h5"), dmi.open(f"{tmp}/ref{ring}.h5")
            for h in b.hooks:
                for r in b.requests:
                    assert torch.equal(a.get(h, r), b.get(h, r)), (ring, h, r)
            lag = model.model.layers[0].register_forward_hook(lambda m, a, o: torch.cuda._sleep(2_000_000))
    finally:
        lag.remove()
        control.ControlTable.upload_entries = None
    return "rows bit-identical to an unlagged run; books balance"


@section("no compute-stream sync in the hot path; ring memory fixed", 90)
def check_sync():
    """dmi's own per-step path (plan, upload, capture launches, seal) under sync debug mode
    "error": any host read of the device raises. (HF's generate syncs by itself each step for
    its stopping criteria; that is not dmi's and is left out by driving the steps directly.)"""
    import numpy as np
    import torch

    import dmi
    from dmi.plan import DECODE, RowTable

    model = tiny_model()
    path = tempfile.mktemp(suffix=".h5")
    B = 16
    with dmi.attach(model, {"hooks": ["blocks.*.hook_resid_post", "hook_logits"], "sink": path}) as s:
        xs = [torch.randn(B, 1, *b.row_shape, device="cuda", dtype=b.dtype) for b in s.bindings]
        before = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(200):
                rows = RowTable(B, 1, [f"r{i}" for i in range(B)], np.arange(B, dtype=np.int32),
                                np.full(B, step, np.int64), np.full(B, DECODE, np.int8))
                s.begin_step(rows)
                for i, x in enumerate(xs):
                    s.capture(i, x)
                s.end_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        after = torch.cuda.memory_allocated()
        s.flush()
        stats = s.stats()
    assert stats["rows"]["dropped"] == 0 and after == before, (stats["rows"], before, after)
    return (f"200 planned steps x {len(xs)} hooks without a sync; allocated {before} -> {after} bytes; "
            f"drain {stats['drain_mb_s']:.0f} MB/s")


@section("timing: Qwen3-4B shape, batch 1/16/64, decode 16/128", 330)
def check_timing():
    import subprocess

    from matrix_bench.cli import pinned_copy_mb_s

    out = tempfile.mktemp(suffix=".h5")
    rep = tempfile.mktemp(suffix=".md")
    cmd = [sys.executable, "-m", "matrix_bench", "--engines", "hf", "--model", "qwen3-4b", "--batch-sizes", "1,16,64",
           "--decode-lens", "16,128", "--prompt-len", "32", "--repeats", "3", "--dtype", "bfloat16", "--device", "cuda",
           "--modes", "off,dmi,off-graphs,dmi-graphs,hf-hidden-states", "--ring-bytes", str(1 << 30),
           "--out", out, "--report", rep]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=320)
    text = open(rep).read() if os.path.exists(rep) else p.stdout[-4000:] + p.stderr[-2000:]
    return f"pinned D2H {pinned_copy_mb_s('cuda'):.0f} MB/s\n\n{text}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", default="gpu-check.md")
    ap.add_argument("--link")
    args = ap.parse_args()
    if args.link:
        link(args.link)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing ran", file=sys.stderr)
        return 2
    started = time.monotonic()
    for check in (check_kernel, check_graphs, check_interventions, check_graph_break, check_races, check_sync,
                  check_timing):
        check()
    lines = [f"# dmi GPU check ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{time.monotonic() - started:.0f} s)", ""]
    for name, status, detail in RESULTS:
        lines += [f"## {name}: {status}", "", detail, ""]
    with open(args.report, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(s.startswith("pass") for _, s, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
