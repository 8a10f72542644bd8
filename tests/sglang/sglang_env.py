"""How the SGLang tests start engines on CPU.

The environment is set on import (conftest imports this first, before anything imports
sglang) and reaches the scheduler process SGLang spawns: the sgl_kernel stand-in (cpu/, SGLang's CPU kernel package is not on
the registry) on PYTHONPATH and SGLang's CPU engine switch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

CPU = Path(__file__).parent / "cpu"
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
if str(CPU) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU), os.environ.get("PYTHONPATH")) if p)
if str(CPU) not in sys.path:
    sys.path.insert(0, str(CPU))
os.environ.pop("DMI_SPEC", None)  # an armed spec from the shell would arm every engine here


def require_sglang():
    """sglang, or a skip; a failure when CI says this venv must have it (DMI_REQUIRE_ENGINES)."""
    required = "sglang" in os.environ.get("DMI_REQUIRE_ENGINES", "").replace(",", " ").split()
    try:
        import sglang
    except ImportError:
        sglang = None
    # Without SGLang installed, `import sglang` finds this test folder (tests/ is on sys.path)
    # as a namespace package: that is "not installed" too.
    if sglang is None or getattr(sglang, "__file__", None) is None:
        if required:
            pytest.fail("DMI_REQUIRE_ENGINES names sglang but it is not installed in this venv")
        pytest.skip("sglang is not installed")
    return sglang


ENGINE_ARGS = dict(device="cpu", skip_tokenizer_init=True, disable_cuda_graph=True, attention_backend="torch_native",
                   max_total_tokens=4096, dtype="float32", log_level="error")


def start_engine(model_dir, **kw):
    sglang = require_sglang()
    return sglang.Engine(model_path=str(model_dir), **{**ENGINE_ARGS, **kw})
