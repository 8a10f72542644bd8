"""dmi's SGLang adapter: the only dmi code that touches SGLang internals.

The model lives in SGLang's scheduler process, so capture happens there (srt_plugin.py,
control.py, worker.py, rows.py) and the caller holds a RemoteSession (frontend.py).
See docs/sglang.md.
"""
