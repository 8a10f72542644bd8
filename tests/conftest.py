from __future__ import annotations

import pytest
import torch

from dmi.tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def load(tiny_dirs):
    from transformers import AutoModelForCausalLM

    cache = _MODELS

    def _load(family: str, attn: str = "eager", dtype=torch.float32):
        key = (family, attn, dtype)
        if key not in cache:
            cache[key] = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], attn_implementation=attn,
                                                              dtype=dtype).eval()
        return cache[key]

    return _load


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "cap.h5")


_MODELS: dict = {}


@pytest.fixture(autouse=True)
def _no_session_left_behind(request):
    """Every test closes its sessions: the shared models must not carry one into the next test."""
    yield
    from dmi.session import _ARMED

    left = list(_ARMED.values())
    for s in left:
        s.close()
    assert not left, f"{request.node.nodeid} left {len(left)} dmi session(s) open"
