"""matrix_bench runs vLLM cells for real: no capture, dmi and dmi-null side by side."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


def test_matrix_bench_runs_vllm_modes(tmp_path):
    from vllm_util import require_vllm

    require_vllm()
    from matrix_bench.cli import main
    from matrix_bench.results import read

    out = tmp_path / "bench.h5"
    assert main(["--engines", "vllm", "--model", "tiny", "--batch-sizes", "2", "--decode-lens", "3",
                 "--prompt-len", "6", "--repeats", "1", "--modes", "off,dmi,dmi-null,hf-attentions",
                 "--out", str(out)]) == 0
    rows = read(str(out))
    ok = {r["mode"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"off", "dmi", "dmi-null"}
    assert ok["dmi"]["bytes_captured"] > 0 and ok["dmi-null"]["bytes_captured"] == 0
    assert all(r["tokens_per_s"] > 0 for r in ok.values())
    assert [r["status"] for r in rows if r["mode"] == "hf-attentions"] == ["not applicable to vllm"]
