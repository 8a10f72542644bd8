"""Ops through which a compiled forward reaches the host side of a session.

Under torch.compile, Python code in forward hooks is traced once, and side effects in it run
at trace time only (silent loss: a known bug of hook-based tools). Calling these opaque ops
from the hooks instead puts each step boundary and each capture into the graph as a node that
runs every time, in order: all three mutate one token tensor, so nothing reorders or drops
them. Their implementations call back into a registered bridge (an adapter) on the host.
CPU only in spirit: a CUDA graph cannot replay host callbacks (the GPU ring path is separate).
"""
from __future__ import annotations

import itertools
import threading

import torch

_lib = torch.library.Library("dmi", "FRAGMENT")
_lib.define("step_begin(Tensor(a!) token, int bridge, Tensor ref, bool is_ids, Tensor? mask, "
            "Tensor? cache_position) -> ()")
_lib.define("capture_host(Tensor(a!) token, int bridge, int hook, Tensor x, bool flat) -> ()")
_lib.define("step_end(Tensor(a!) token, int bridge) -> ()")

_BRIDGES: dict[int, object] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def register_bridge(obj) -> int:
    """obj has op_step_begin(ref, is_ids, mask, cache_position), op_capture(hook, x, flat), op_step_end()."""
    with _lock:
        bid = next(_ids)
        _BRIDGES[bid] = obj
    return bid


def unregister_bridge(bid: int) -> None:
    with _lock:
        _BRIDGES.pop(bid, None)


def _step_begin(token, bridge, ref, is_ids, mask, cache_position) -> None:
    b = _BRIDGES.get(bridge)
    if b is not None:  # a graph compiled while attached, run after detach: capture nothing
        b.op_step_begin(ref, is_ids, mask, cache_position)


def _capture_host(token, bridge, hook, x, flat) -> None:
    b = _BRIDGES.get(bridge)
    if b is not None:
        b.op_capture(hook, x, flat)


def _step_end(token, bridge) -> None:
    b = _BRIDGES.get(bridge)
    if b is not None:
        b.op_step_end()


for _name, _fn in (("step_begin", _step_begin), ("capture_host", _capture_host), ("step_end", _step_end)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dmi::{_name}")(lambda *a, **k: None)

step_begin = torch.ops.dmi.step_begin.default
capture_host = torch.ops.dmi.capture_host.default
step_end = torch.ops.dmi.step_end.default
