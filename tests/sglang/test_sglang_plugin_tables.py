"""An architecture table from an installed plugin (a `dmi` entry point) is honoured in SGLang's
scheduler process, not only at attach: Mistral has no built-in SGLang table; a plugin package on
PYTHONPATH gives it one, and the capture equals HF. A table the scheduler does not have is refused
there with the fix named."""
from __future__ import annotations

import sys

import pytest
from checks import assert_books_balance, assert_request_matches, fed
from sglang_env import start_engine

import dmi
from dmi import plugins

pytestmark = pytest.mark.sglang

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]
PLUGIN = '''
from dmi.plugins import hookimpl


@hookimpl
def dmi_arch_tables(engine):
    if engine == "sglang":
        from dmi.adapters.sglang.tables.base import LLAMA_LIKE, SGLangTable

        return [SGLangTable(family="plugin-mistral", architectures=("MistralForCausalLM",), taps=dict(LLAMA_LIKE))]
    return None
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A plugin distribution on PYTHONPATH: the scheduler (a fresh process) finds its entry point;
    this process, whose plugin manager has loaded already, registers the module itself."""
    import importlib

    root = tmp_path / "site"
    (root / "dmi_test_mistral").mkdir(parents=True)
    (root / "dmi_test_mistral" / "__init__.py").write_text(PLUGIN)
    info = root / "dmi_test_mistral-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dmi-test-mistral\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dmi]\ntest_mistral = dmi_test_mistral\n")
    monkeypatch.setenv("PYTHONPATH", f"{root}:{__import__('os').environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("dmi_test_mistral")
    pm = plugins.manager()
    if pm.get_plugin("test_mistral") is None:
        pm.register(module, name="test_mistral")
    yield module
    pm.unregister(name="test_mistral")
    sys.modules.pop("dmi_test_mistral", None)


def test_plugin_table_reaches_the_scheduler(installed_plugin, tmp_path):
    import torch
    from families import save_family_model
    from transformers import AutoModelForCausalLM

    path = save_family_model("mistral", tmp_path / "mistral")
    out = str(tmp_path / "cap.h5")
    engine = start_engine(path, disable_radix_cache=True)
    try:
        with dmi.attach(engine, {"hooks": ["resid", "attn", "mlp", "hook_logits"], "sink": out}):
            outs = engine.generate(input_ids=PROMPTS, sampling_params=[
                {"temperature": 0, "ignore_eos": True, "max_new_tokens": m} for m in (3, 2)])
    finally:
        engine.shutdown()
    run = dmi.open(out)
    assert {"blocks.1.attn.hook_v", "blocks.0.mlp.hook_post", "hook_logits"} <= set(run.hooks)
    assert_books_balance(run.stats)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    for p, o in zip(PROMPTS, outs):
        assert_request_matches(run, hf, o["meta_info"]["id"], fed(p, o), run.hooks, logits_from=len(p) - 1)
    run.close()


def test_scheduler_without_the_table_names_the_fix(monkeypatch):
    """What a scheduler answers when the caller validated against a table it lacks."""
    from types import SimpleNamespace

    from dmi.adapters.sglang import control
    from dmi.errors import EngineNotSupportedError

    cfg = SimpleNamespace(architectures=["MistralForCausalLM"])
    runner = SimpleNamespace(model_config=SimpleNamespace(hf_config=cfg))
    monkeypatch.setitem(control._STATE, "runner", runner)
    monkeypatch.setattr(control, "_graphs_captured", lambda r: False)
    with pytest.raises(EngineNotSupportedError, match="no SGLang architecture table.*'plugin-mistral'.*entry point"):
        control.open_session('{"hooks": ["resid"]}', family="plugin-mistral")
