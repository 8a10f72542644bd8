"""Entry point: claims sink specs of the form {"kind": "callback", "target": "module:function"}."""
from __future__ import annotations

from dmi.plugins import hookimpl


@hookimpl
def dmi_sink_for(sink_spec):
    if not (isinstance(sink_spec, dict) and sink_spec.get("kind") == "callback"):
        return None
    from .sink import CallbackSink

    if "target" not in sink_spec:
        raise ValueError("sink.target: a callback sink needs {'kind': 'callback', 'target': 'module:function'}")
    return CallbackSink(sink_spec["target"])
