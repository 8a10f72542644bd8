"""matrix_bench runs vLLM cells for real: no capture, dmi and dmi-null side by side."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


def test_matrix_bench_runs_vllm_modes(tmp_path):
    from helpers import check_engine_bench
    from vllm_util import require_vllm

    require_vllm()
    check_engine_bench("vllm", tmp_path)
