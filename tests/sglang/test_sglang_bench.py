"""matrix_bench runs SGLang cells for real: no capture, dmi, dmi-null and SGLang's own
return_hidden_states side by side."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.sglang


def test_matrix_bench_runs_sglang_modes(tmp_path):
    from helpers import check_engine_bench
    from sglang_env import require_sglang

    require_sglang()
    check_engine_bench("sglang", tmp_path, own_modes=("sglang-hidden-states",))
