"""The plugin registry (pluggy, project and entry-point group "dmi").

Built-in adapters and sinks register through the same entry points a third party uses.
PLUGIN_API_VERSION is the version of the hook specifications below and of the Adapter and
Sink interfaces (dmi/adapter.py, dmi/sinks/base.py); a change that breaks an existing plugin
bumps it. docs/plugins.md is the contract in prose.

A plugin that fails to load, raises, or returns the wrong type is reported (logged, and listed
by `dmi plugins`) and skipped: the other plugins and the built-ins keep working.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

PROJECT = "dmi"
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
log = logging.getLogger("dmi")


class DmiHookSpecs:
    @hookspec
    def dmi_adapter_for(self, engine, tables):
        """Return an Adapter for `engine` if this plugin serves that kind of engine, else None.
        `tables(engine_kind)` returns every registered architecture table for that kind. Raise a
        ValueError (e.g. EngineNotSupportedError) when the engine is yours but cannot be served,
        saying why; exactly one plugin may claim an engine."""

    @hookspec
    def dmi_sink_for(self, sink_spec):
        """Return a Sink for the spec's `sink` value (a path, or {"kind": ..., ...}) if this plugin
        handles it, else None. Raise a ValueError naming the problem for a bad value (an
        unwritable path); nothing may be created before open()."""

    @hookspec
    def dmi_arch_tables(self, engine: str):
        """Return a list of architecture tables for engine kind `engine` ("hf", ...), or None."""

    @hookspec
    def dmi_request_predicates(self):
        """Return {name: predicate(request_id: str) -> bool}; a spec selects one by name
        (requests.predicate) to decide, once per request, whether it is captured."""


@dataclass
class PluginProblem:
    plugin: str
    package: str
    problem: str


_pm: pluggy.PluginManager | None = None
_lock = threading.Lock()
problems: list[PluginProblem] = []
_packages: dict[int, str] = {}  # id(plugin) -> "distribution version", for entry-point plugins
_BUILTINS = {"hf": "dmi.adapters.hf.plugin", "hdf5": "dmi.sinks.hdf5_plugin", "memory": "dmi.sinks.memory_plugin",
             "dataset": "dmi.sinks.dataset_plugin"}


def manager() -> pluggy.PluginManager:
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(DmiHookSpecs)
            for ep in entry_points(group=PROJECT):
                if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                    continue
                try:
                    plugin = ep.load()
                    pm.register(plugin, name=ep.name)
                    _packages[id(plugin)] = _dist_name(ep)
                except Exception as e:  # one broken package must not take dmi down
                    _report(ep.name, _dist_name(ep), f"failed to load: {type(e).__name__}: {e}")
            # A source checkout used without `pip install` has no entry points; register the
            # built-ins by module so it still works.
            for name, mod in _BUILTINS.items():
                if pm.get_plugin(name) is None:
                    pm.register(importlib.import_module(mod), name=name)
            _pm = pm
    return _pm


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"


def package_of(plugin) -> str:
    """The distribution a plugin came from ("dmi-toyengine 0.1.0"), or its module."""
    return _packages.get(id(plugin)) or getattr(plugin, "__name__", None) or type(plugin).__module__


def _report(plugin: str, package: str, problem: str) -> None:
    p = PluginProblem(plugin, package, problem)
    if p not in problems:
        problems.append(p)
        log.warning("dmi: plugin %r (%s) %s; skipped", plugin, package, problem)


def _call_each(hookname: str, **kwargs):
    """Call every implementation of a hook separately, so one that raises or misbehaves is
    reported and skipped instead of failing the call. Yields (plugin name, package, result)."""
    pm = manager()
    for impl in reversed(getattr(pm.hook, hookname).get_hookimpls()):
        name = impl.plugin_name
        try:
            result = impl.function(**{a: kwargs[a] for a in impl.argnames})
        except ValueError:
            raise  # a plugin saying "this is mine but it can't be done": the user's answer
        except Exception as e:
            _report(name, package_of(impl.plugin), f"raised in {hookname}: {type(e).__name__}: {e}")
            continue
        yield name, package_of(impl.plugin), result


def arch_tables(engine: str) -> list:
    out = []
    for name, pkg, tables in _call_each("dmi_arch_tables", engine=engine):
        if tables is None:
            continue
        if not isinstance(tables, (list, tuple)):
            _report(name, pkg, f"dmi_arch_tables returned {type(tables).__name__}, not a list")
            continue
        out.extend(tables)
    return out


def request_predicates() -> dict:
    out: dict = {}
    for name, pkg, found in _call_each("dmi_request_predicates"):
        if isinstance(found, dict):
            out.update(found)
        elif found is not None:
            _report(name, pkg, f"dmi_request_predicates returned {type(found).__name__}, not a dict")
    return out


def adapter_for(engine):
    from dmi.adapter import Adapter
    from dmi.errors import EngineNotSupportedError

    claims = _claims("dmi_adapter_for", Adapter, engine=engine, tables=arch_tables)
    if not claims and _is_module(engine):  # no engine adapter: any nn.Module with module: hooks and HookPoints
        from dmi.adapters.hf.generic import ModuleAdapter

        return ModuleAdapter(engine)
    if not claims:
        names = [n for n, _ in manager().list_name_plugin()]
        raise EngineNotSupportedError(f"no dmi adapter recognises a {type(engine).__module__}.{type(engine).__name__}; "
                                      f"registered plugins: {', '.join(names)}")
    return _one(claims, f"engine {type(engine).__name__}")


def _is_module(engine) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(engine, torch.nn.Module)


def sink_for(sink_spec):
    from dmi.errors import SinkPathError
    from dmi.sinks.base import Sink

    claims = _claims("dmi_sink_for", Sink, sink_spec=sink_spec)
    if not claims:
        raise SinkPathError(f"no sink plugin handles {sink_spec!r}; give a file path (HDF5) or "
                            f"{{'kind': 'hdf5', 'path': ...}}, \"memory\" or {{'kind': 'memory', 'max_bytes': N}}, or "
                            f"{{'kind': 'dataset', 'path': DIR or 's3://...'}}")
    return _one(claims, f"sink {sink_spec!r}")


def _claims(hookname: str, expected: type, **kwargs) -> list[tuple[str, str, object]]:
    claims = []
    for name, pkg, result in _call_each(hookname, **kwargs):
        if result is None:
            continue
        if not isinstance(result, expected):
            _report(name, pkg, f"{hookname} returned {type(result).__name__}, expected {expected.__name__}")
            continue
        claims.append((name, pkg, result))
    return claims


def _one(claims, what: str):
    if len(claims) > 1:
        who = "; ".join(f"plugin {n!r} from {p}" for n, p, _ in claims)
        raise ValueError(f"more than one plugin claims {what}: {who}. Uninstall one, or block one with "
                         f"dmi.plugins.manager().set_blocked(name)")
    return claims[0][2]
