"""The built-ins are found through the `dmi` entry points, exactly as a third party's would be."""
from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

import dmi
from dmi import plugins


def test_builtins_registered_by_entry_points():
    eps = {ep.name: ep.value for ep in entry_points(group="dmi")}
    assert eps.get("hf") == "dmi.adapters.hf.plugin"
    assert eps.get("hdf5") == "dmi.sinks.hdf5_plugin"
    names = dict(plugins.manager().list_name_plugin())
    assert "hf" in names and "hdf5" in names  # registered under their entry-point names
    assert plugins.PLUGIN_API_VERSION == 1


def test_adapter_and_sink_resolution(load, tmp_path):
    from dmi.adapters.hf import HFAdapter
    from dmi.sinks.hdf5 import HDF5Sink

    assert isinstance(plugins.adapter_for(load("gpt2")), HFAdapter)
    assert isinstance(plugins.sink_for(str(tmp_path / "a.h5")), HDF5Sink)
    assert isinstance(plugins.sink_for({"kind": "hdf5", "path": str(tmp_path / "b.h5")}), HDF5Sink)
    with pytest.raises(ValueError, match="no sink plugin handles"):
        plugins.sink_for({"kind": "parquet", "path": "x"})
    families = {t.family for t in plugins.arch_tables("hf")}
    assert {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt2"} <= families


def test_a_model_without_a_table_is_derived_and_one_without_layers_is_refused_naming_what_is_missing(tmp_path):
    from transformers import AutoModelForCausalLM, PhiConfig

    model = AutoModelForCausalLM.from_config(PhiConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64))
    assert "blocks.0.hook_resid_post" in plugins.adapter_for(model).offered()  # no table: from structure
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="model_type 'phi'.*no decoder-layer list.*qwen3"):
        dmi.attach(model, {"sink": str(tmp_path / "x.h5")})
