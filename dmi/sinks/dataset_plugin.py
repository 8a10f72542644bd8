"""Registers the dataset sink for {"kind": "dataset", "path": DIR or URL, ...}."""
from __future__ import annotations

from dmi.plugins import hookimpl

FIELDS = ("kind", "path", "rank", "shard_bytes", "overwrite", "storage_options", "compression", "flush_every_s",
          "shard_format", "encode_threads", "value_encoding", "release_pages")


@hookimpl
def dmi_sink_for(sink_spec):
    if not (isinstance(sink_spec, dict) and sink_spec.get("kind") == "dataset"):
        return None
    from dmi.errors import SpecError

    unknown = set(sink_spec) - set(FIELDS)
    if unknown:
        raise SpecError("sink", f"unknown field(s) {sorted(unknown)} for the dataset sink; valid: {', '.join(FIELDS)}")
    if "path" not in sink_spec:
        raise SpecError("sink.path", "a dataset sink needs {'kind': 'dataset', 'path': DIR or 's3://bucket/prefix'}")
    from dmi.sinks.dataset import DatasetSink

    try:
        import pyarrow  # noqa: F401
        sink = DatasetSink(**{k: v for k, v in sink_spec.items() if k != "kind"})   # fsspec resolves the path
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SpecError("sink", f"the dataset sink needs pyarrow and fsspec: pip install 'dmi[data]' ({e})") from e
    sink.check_writable()
    return sink
