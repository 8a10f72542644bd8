"""A broken plugin is reported, naming itself and its package; the built-ins keep working."""
from __future__ import annotations

import sys

import pytest
import torch

import dmi
from dmi import plugins
from dmi.plugins import hookimpl


class Raises:
    @hookimpl
    def dmi_adapter_for(self, engine, tables):
        raise RuntimeError("boom")

    @hookimpl
    def dmi_arch_tables(self, engine):
        raise KeyError("tables broke")


class WrongType:
    @hookimpl
    def dmi_adapter_for(self, engine):
        return "not an adapter"

    @hookimpl
    def dmi_sink_for(self, sink_spec):
        return 42


class ClaimsHF:
    @hookimpl
    def dmi_adapter_for(self, engine, tables):
        from dmi.adapters.hf import HFAdapter
        from dmi.adapters.hf.tables import qwen3

        return HFAdapter(engine, qwen3.TABLE)


@pytest.fixture
def registered():
    added = []

    def add(plugin, name):
        plugins.manager().register(plugin, name=name)
        added.append(plugin)

    yield add
    for p in added:
        plugins.manager().unregister(p)
    plugins.problems.clear()


def test_raising_and_wrong_type_plugins_are_reported_and_skipped(registered, load, tmp_path):
    registered(Raises(), "raiser")
    registered(WrongType(), "wrongtype")
    model = load("qwen3")
    with dmi.attach(model, {"hooks": ["blocks.0.hook_resid_post"], "sink": str(tmp_path / "x.h5")}):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    assert len(dmi.open(tmp_path / "x.h5").get("blocks.0.hook_resid_post", "0")) == 3
    problems = {(p.plugin, p.problem.split(":")[0]) for p in plugins.problems}
    assert ("raiser", "raised in dmi_adapter_for") in problems
    assert ("raiser", "raised in dmi_arch_tables") in problems
    assert any(p.plugin == "wrongtype" and "returned str, expected Adapter" in p.problem for p in plugins.problems)
    assert any(p.plugin == "wrongtype" and "returned int, expected Sink" in p.problem for p in plugins.problems)
    from dmi.cli.plugins_cmd import list_plugins

    text = list_plugins()
    assert "raiser" in text and "problems" in text and "boom" in text


def test_two_plugins_claiming_one_engine_is_an_error_naming_both(registered, load, tmp_path):
    registered(ClaimsHF(), "claims-hf")
    with pytest.raises(ValueError, match=r"more than one plugin claims engine.*'claims-hf'.*'hf' from dmi"):
        dmi.attach(load("qwen3"), {"sink": str(tmp_path / "x.h5")})


def test_a_package_that_fails_to_load_is_reported(tmp_path, monkeypatch):
    dist = tmp_path / "broken_dmi_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dmi-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dmi]\nbroken = no_such_module_anywhere.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = plugins._pm
    plugins._pm = None
    try:
        pm = plugins.manager()
        assert pm.get_plugin("hf") is not None and pm.get_plugin("broken") is None
        assert any(p.plugin == "broken" and p.package == "broken-dmi-plugin 0.1" and "failed to load" in p.problem
                   for p in plugins.problems)
    finally:
        plugins._pm = saved
        plugins.problems.clear()
        sys.modules.pop("no_such_module_anywhere", None)
