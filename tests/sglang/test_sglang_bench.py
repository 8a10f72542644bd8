"""matrix_bench runs SGLang cells for real: no capture, dmi, dmi-null and SGLang's own
return_hidden_states side by side."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.sglang


def test_matrix_bench_runs_sglang_modes(tmp_path):
    from sglang_env import require_sglang

    require_sglang()
    from matrix_bench.cli import main
    from matrix_bench.results import read

    out = tmp_path / "bench.h5"
    assert main(["--engines", "sglang", "--model", "tiny", "--batch-sizes", "2", "--decode-lens", "3",
                 "--prompt-len", "6", "--repeats", "1", "--modes", "off,dmi,dmi-null,sglang-hidden-states,hf-attentions",
                 "--out", str(out)]) == 0
    rows = read(str(out))
    ok = {r["mode"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"off", "dmi", "dmi-null", "sglang-hidden-states"}
    assert ok["dmi"]["bytes_captured"] > 0 and ok["dmi-null"]["bytes_captured"] == 0
    assert all(r["tokens_per_s"] > 0 for r in ok.values())
    assert [r["status"] for r in rows if r["mode"] == "hf-attentions"] == ["not applicable to sglang"]
