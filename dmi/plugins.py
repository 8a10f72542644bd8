"""The plugin registry (pluggy, project and entry-point group "dmi").

Built-in adapters and sinks register through the same entry points a third party
uses. PLUGIN_API_VERSION is the version of the hook specifications below; a change
that breaks an existing plugin bumps it.
"""
from __future__ import annotations

import logging
import threading

import pluggy

PROJECT = "dmi"
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
log = logging.getLogger("dmi")


class DmiHookSpecs:
    @hookspec(firstresult=True)
    def dmi_adapter_for(self, engine, tables):
        """Return an Adapter for `engine` if this plugin serves it, else None. `tables(engine_kind)`
        returns every registered architecture table for that engine kind."""

    @hookspec(firstresult=True)
    def dmi_sink_for(self, sink_spec):
        """Return a Sink for the spec's `sink` value (a path, or {"kind": ..., ...}) if this plugin
        handles it, else None. Raise a ValueError naming the problem for a bad path."""

    @hookspec
    def dmi_arch_tables(self, engine: str):
        """Return a list of architecture tables for engine kind `engine` ("hf", ...), or None."""

    @hookspec
    def dmi_request_predicates(self):
        """Return {name: predicate(request_id: str) -> bool}; a spec selects one by name
        (requests.predicate) to decide, once per request, whether it is captured."""


_pm: pluggy.PluginManager | None = None
_lock = threading.Lock()
_BUILTINS = ("dmi.adapters.hf.plugin", "dmi.sinks.hdf5_plugin")


def manager() -> pluggy.PluginManager:
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(DmiHookSpecs)
            pm.load_setuptools_entrypoints(PROJECT)
            # A source checkout used without `pip install` has no entry points; register the
            # built-ins by module so it still works.
            import importlib

            for mod in _BUILTINS:
                m = importlib.import_module(mod)
                if not pm.is_registered(m):
                    pm.register(m, name=mod)
            _pm = pm
    return _pm


def arch_tables(engine: str) -> list:
    out = []
    for tables in manager().hook.dmi_arch_tables(engine=engine):
        out.extend(tables or [])
    return out


def request_predicates() -> dict:
    out: dict = {}
    for found in manager().hook.dmi_request_predicates():
        out.update(found or {})
    return out


def adapter_for(engine):
    from dmi.errors import EngineNotSupportedError

    adapter = manager().hook.dmi_adapter_for(engine=engine, tables=arch_tables)
    if adapter is None:
        names = [n for n, _ in manager().list_name_plugin()]
        raise EngineNotSupportedError(f"no dmi adapter recognises a {type(engine).__module__}.{type(engine).__name__}; "
                                      f"registered plugins: {', '.join(names)}")
    return adapter


def sink_for(sink_spec):
    from dmi.errors import SinkPathError

    sink = manager().hook.dmi_sink_for(sink_spec=sink_spec)
    if sink is None:
        raise SinkPathError(f"no sink plugin handles {sink_spec!r}; give a file path (HDF5) or "
                            f"{{'kind': 'hdf5', 'path': ...}}")
    return sink
