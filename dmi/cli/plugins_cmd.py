"""`dmi plugins`: what is registered, from which package, and what failed to load."""
from __future__ import annotations


def list_plugins() -> str:
    from dmi import plugins

    pm = plugins.manager()
    lines = [f"dmi plugin API version {plugins.PLUGIN_API_VERSION}", ""]
    rows = []
    for name, plugin in sorted(pm.list_name_plugin()):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append((name, plugins.package_of(plugin), ", ".join(h.removeprefix("dmi_") for h in hooks)))
    widths = [max(len(r[i]) for r in rows + [("plugin", "package", "provides")]) for i in range(3)]
    for r in [("plugin", "package", "provides")] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    tables = plugins.arch_tables("hf")
    if tables:
        lines += ["", "HF architecture tables: " + ", ".join(f"{t.family} ({', '.join(t.model_types)})" for t in tables)]
    preds = plugins.request_predicates()
    if preds:
        lines += ["request predicates: " + ", ".join(sorted(preds))]
    if plugins.problems:
        lines += ["", "problems (these plugins are skipped; the rest work):"]
        lines += [f"  {p.plugin} ({p.package}): {p.problem}" for p in plugins.problems]
    return "\n".join(lines)
