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
        for key in ("torch", "transformers", "dmi", "git_revision", "machine", "hooks"):
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
    assert text == markdown(rows) and "| hf | 4 | 4 |" in text and "skipped" in text
