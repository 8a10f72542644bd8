"""The benchmark's smoke preset runs end to end and writes a well-formed file (not a timing test)."""
from __future__ import annotations

import h5py

from matrix_bench.cli import main
from matrix_bench.modes_hf import MODES
from matrix_bench.report import markdown
from matrix_bench.results import read


def test_cpu_smoke_preset(tmp_path, capsys):
    out = tmp_path / "bench.h5"
    assert main(["--preset", "cpu-smoke", "--out", str(out), "--engines", "hf,vllm",
                 "--report", str(tmp_path / "r.md")]) == 0
    rows = read(str(out))
    with h5py.File(out) as f:
        assert f.attrs["format"] == "dmi-matrix-bench"
        for key in ("torch", "transformers", "dmi", "git_revision", "machine", "hooks", "spec"):
            assert key in f.attrs
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] != "ok"]
    assert {r["mode"] for r in ok} == {"off", "dmi", "dmi-null", "hf-hidden-states", "forward-hook-cpu"} <= set(MODES)
    assert {(r["batch"], r["decode_len"]) for r in ok} == {(1, 4), (4, 4)}
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in ok)
    dmi_rows = [r for r in ok if r["mode"] == "dmi"]
    assert all(r["bytes_captured"] > 0 and r["rows_dropped"] == 0 for r in dmi_rows)
    assert all(r["bytes_captured"] == 0 for r in ok if r["mode"] == "dmi-null")
    assert skipped and all(r["engine"] == "vllm" and r["status"].startswith("skipped: ") for r in skipped)
    text = (tmp_path / "r.md").read_text()
    assert text.startswith(markdown(rows)) and "| hf | 4 | 4 |" in text and "skipped" in text
    for name in ("r-throughput-vs-batch.png", "r-throughput-vs-decode.png", "r-overhead.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"]({name})" in text


def test_report_from_an_earlier_file_and_dmi_bench(tmp_path, capsys):
    from dmi.cli import main as dmi_main

    out = tmp_path / "b.h5"
    assert dmi_main(["bench", "--model", "tiny", "--batch-sizes", "2", "--decode-lens", "2", "--repeats", "1",
                     "--modes", "off,dmi,nnsight", "--out", str(out)]) == 0
    rows = read(str(out))
    nn = [r for r in rows if r["mode"] == "nnsight"]
    assert nn and all(r["status"] == "ok" or r["status"] == "skipped: nnsight not installed" for r in nn)
    capsys.readouterr()
    assert main(["--from", str(out), "--report", str(tmp_path / "again.md")]) == 0
    assert "| hf | 2 | 2 |" in capsys.readouterr().out
    assert (tmp_path / "again-overhead.png").exists()


def test_pinned_copy_bandwidth_is_zero_without_a_gpu_and_positive_with_one():
    import torch

    from matrix_bench.cli import pinned_copy_mb_s

    assert pinned_copy_mb_s("cpu") == 0.0
    got = pinned_copy_mb_s("cuda", nbytes=1 << 20, repeats=2)
    assert got > 0 if torch.cuda.is_available() else got == 0.0


def test_steer_modes_run(tmp_path, capsys):
    """steer (every request) and steer-mixed (half the requests, one vector each): interventions
    only, nothing captured."""
    out = tmp_path / "s.h5"
    assert main(["--model", "tiny", "--batch-sizes", "4", "--decode-lens", "2", "--repeats", "1",
                 "--modes", "off,steer,steer-mixed", "--out", str(out)]) == 0
    ok = [r for r in read(str(out)) if r["status"] == "ok"]
    assert {r["mode"] for r in ok} == {"off", "steer", "steer-mixed"}
    assert all(r["bytes_captured"] == 0 and r["rows_dropped"] == 0 for r in ok)


def test_steer_specs_steer_what_they_say(load):
    from matrix_bench.modes_hf import steer_spec

    model = load("qwen3")
    one = steer_spec("steer", model, 8, 1 << 30)
    assert one.hooks == [] and len(one.interventions) == 1 and one.interventions[0].requests.ids is None
    mixed = steer_spec("steer-mixed", model, 8, 1 << 30)
    assert [iv.requests.ids for iv in mixed.interventions] == [["0"], ["1"], ["2"], ["3"]]
    assert len({tuple(iv.value) for iv in mixed.interventions}) == 4


def test_peak_rss_sees_a_peak_inside_the_block_and_none_from_before(monkeypatch):
    import numpy as np

    from matrix_bench.modes_hf import PeakRSS

    big = np.ones(96 << 20, dtype=np.uint8)  # touched: resident before the next block
    del big
    with PeakRSS() as quiet:
        pass
    with PeakRSS() as busy:
        a = np.ones(96 << 20, dtype=np.uint8)
        del a
    assert busy.peak - quiet.peak > 80 << 20
    # without the kernel's counter (another OS, or clear_refs not writable) a thread samples
    monkeypatch.setattr(PeakRSS, "_reset_hwm", staticmethod(lambda: False))
    with PeakRSS(every_s=0.001) as sampled:
        a = np.ones(96 << 20, dtype=np.uint8)
        import time

        time.sleep(0.05)
        del a
    assert sampled.peak - quiet.peak > 80 << 20


def test_overhead_cells_give_the_median_and_quartiles_of_per_repeat_ratios():
    import numpy as np

    off = [1.0, 2.0, 1.0, 4.0, 1.0, 1.5, 2.0]          # a drifting machine: off itself varies 4x
    dmi = [1.1, 2.6, 1.05, 4.8, 1.3, 1.5, 2.2]
    rows = [dict(engine="hf", mode=m, batch=1, decode_len=4, prompt_len=4, repeat=r, seconds=s,
                 tokens_per_s=4 / s, step_ms=1.0, bytes_captured=0, rows_dropped=0, close_s=0.0, peak_mem=0,
                 status="ok", cpu_s=float("nan"))
            for m, secs in (("off", off), ("dmi", dmi)) for r, s in enumerate(secs)]
    ratios = np.array(dmi) / np.array(off) - 1           # paired by repeat, not medians of each mode
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    line = next(l for l in markdown(rows).splitlines() if l.startswith("| hf | 1 | 4 |"))
    assert line.rstrip(" |").endswith(f"{100 * med:+.1f}% [{100 * q1:+.1f}, {100 * q3:+.1f}]"), line
    # fewer than 4 repeats: the median alone
    line = next(l for l in markdown([r for r in rows if r["repeat"] < 3]).splitlines() if l.startswith("| hf |"))
    assert line.rstrip(" |").endswith(f"{100 * np.median(ratios[:3]):+.1f}%"), line


def test_keep_pages_mode_reaches_the_sink_also_behind_a_slow_sink(tmp_path):
    import dmi
    from matrix_bench.modes_hf import _sink, capture_spec

    for delay in (0.0, 0.001):
        spec = capture_spec("dmi-keep-pages", ["blocks.0.hook_resid_post"], 1 << 20, _sink(str(tmp_path / "k.h5"), delay))
        sink = dmi.plugins.sink_for(spec.sink)
        assert not sink.pages.enabled, delay
        spec = capture_spec("dmi", ["blocks.0.hook_resid_post"], 1 << 20, _sink(str(tmp_path / "d.h5"), delay))
        assert dmi.plugins.sink_for(spec.sink).pages.enabled == dmi.sinks.pagecache.supported(), delay


def test_discard_mode_drains_what_dmi_captures(tmp_path):
    out = tmp_path / "bench.h5"
    assert main(["--model", "tiny", "--batch-sizes", "2", "--decode-lens", "4", "--prompt-len", "8", "--repeats", "1",
                 "--modes", "off,dmi,dmi-discard", "--out", str(out)]) == 0
    rows = {r["mode"]: r for r in read(str(out)) if r["status"] == "ok"}
    assert rows["dmi-discard"]["bytes_captured"] == rows["dmi"]["bytes_captured"] > 0
    assert rows["dmi-discard"]["rows_dropped"] == rows["dmi"]["rows_dropped"] == 0
