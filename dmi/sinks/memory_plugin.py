"""Registers the in-memory sink for sink="memory" and {"kind": "memory", "max_bytes": N}."""
from __future__ import annotations

from dmi.plugins import hookimpl


@hookimpl
def dmi_sink_for(sink_spec):
    if sink_spec == "memory":
        sink_spec = {"kind": "memory"}
    if not (isinstance(sink_spec, dict) and sink_spec.get("kind") == "memory"):
        return None
    from dmi.errors import SpecError
    from dmi.sinks.memory import DEFAULT_MAX_BYTES, MemorySink

    unknown = set(sink_spec) - {"kind", "max_bytes"}
    if unknown:
        raise SpecError("sink", f"unknown field(s) {sorted(unknown)} for the memory sink; valid: kind, max_bytes")
    return MemorySink(sink_spec.get("max_bytes", DEFAULT_MAX_BYTES))
