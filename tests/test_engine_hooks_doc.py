"""docs/engine-hooks.md is what scripts/engine_hooks.py renders from the HF derivation (tiny random
models of the tested families) and the vLLM and SGLang tables (no engine needed: tables are data),
so the published per-architecture lists cannot go stale."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("engine_hooks", ROOT / "scripts" / "engine_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_is_current():
    mod = _script()
    assert mod.PAGE.read_text() == mod.render(), "docs/engine-hooks.md is stale: run python scripts/engine_hooks.py"


def test_page_lists_every_family_and_their_differences():
    page = _script().render()
    hf = page.split("## HF", 1)[1].split("## vLLM", 1)[0]
    for family in ("llama", "gpt2", "gemma3_text", "deepseek_v3", "falcon", "opt", "olmo2", "cohere"):
        assert f" {family} " in hf.splitlines()[2]
    for family in ("gemma2", "gemma3_text", "phi3", "mixtral", "granite", "qwen3_moe",
                   "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                   "GraniteForCausalLM"):
        assert family in page
    # Mixtral's layers are all MoE: no hidden activation row; routing on MoE layers.
    engines = page.split("## vLLM", 1)[1]
    row = next(line for line in engines.splitlines() if line.startswith("| `blocks.{L}.mlp.hook_topk_ids`"))
    assert "moe" in row
