"""An architecture table a plugin registers (dmi_arch_tables) is honoured in vLLM's workers, not
only at attach: Mistral has no built-in vLLM table, a plugin's table captures it exactly. A worker
process that resolves another table than the caller's (a plugin registered at run time in the
caller alone) refuses, naming the fix."""
from __future__ import annotations

import pytest
from vllm_util import require_vllm

require_vllm()

from helpers import assert_books_balance
from vllm_util import check_outputs, env, generate, make_llm, shutdown

import dmi
from dmi import plugins
from dmi.adapters.vllm.tables import LLAMA_LIKE, VllmTable
from dmi.errors import EngineNotSupportedError

pytestmark = pytest.mark.vllm

TABLE = VllmTable("plugin-mistral", ("mistral",), dict(LLAMA_LIKE), notes="from a test plugin")


class MistralTables:
    @plugins.hookimpl
    def dmi_arch_tables(self, engine):
        return [TABLE] if engine == "vllm" else None


@pytest.fixture
def mistral_plugin():
    pm = plugins.manager()
    plugin = MistralTables()
    pm.register(plugin, name="test-mistral-tables")
    yield plugin
    pm.unregister(plugin)


def test_plugin_table_reaches_the_worker(mistral_plugin, tmp_path, out):
    import torch
    from families import save_family_model
    from transformers import AutoModelForCausalLM

    path = save_family_model("mistral", tmp_path / "mistral")  # random norm weights
    with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
        engine = make_llm(path)
    try:
        with dmi.attach(engine, dmi.CaptureSpec(hooks=["resid", "attn", "mlp", "hook_logits"], sink=out)):
            outs = generate(engine)
    finally:
        shutdown(engine)
    run = dmi.open(out)
    assert {"blocks.1.attn.hook_v", "blocks.0.mlp.hook_post", "hook_logits"} <= set(run.hooks)
    assert_books_balance(run.stats)
    check_outputs(run, AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                            dtype=torch.float32).eval(), outs)
    run.close()


def test_worker_refuses_a_table_it_does_not_have(mistral_plugin):
    from dmi.adapters.vllm.worker import worker_table

    assert worker_table("mistral", "plugin-mistral") is TABLE
    with pytest.raises(EngineNotSupportedError, match="validated the spec against table 'other'.*entry point"):
        worker_table("mistral", "other")


def test_worker_without_the_plugin_names_the_fix():
    from dmi.adapters.vllm.worker import worker_table

    with pytest.raises(EngineNotSupportedError, match="no vLLM architecture table for model_type 'mistral'.*entry point"):
        worker_table("mistral", "plugin-mistral")
