"""Ops through which a compiled forward reaches the host side of a session.

Under torch.compile, Python code in forward hooks is traced once, and side effects in it run
at trace time only (silent loss: a known bug of hook-based tools). Calling these opaque ops
from the hooks instead puts each step boundary and each capture into the graph as a node that
runs every time, in order: all three mutate one token tensor, so nothing reorders or drops
them. Their implementations call back into a registered bridge (an adapter) on the host.
A CUDA graph cannot replay host callbacks: on a GPU the capture itself stays in the graph
(dmi::capture reading a device-side plan) and only plan_step/commit_step run on the host.
"""
from __future__ import annotations

import itertools
import threading

import torch

_lib = torch.library.Library("dmi", "FRAGMENT")
# cudagraph_unsafe: inductor's graph partitioning keeps these host callbacks out of CUDA graphs
# (they run every step between the graphed parts) instead of recording them once.
_HOST = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_lib.define("step_begin(Tensor(a!) token, int bridge, Tensor ref, bool is_ids, Tensor? mask, "
            "Tensor? cache_position) -> ()", tags=_HOST)
_lib.define("capture_host(Tensor(a!) token, int bridge, int hook, Tensor x, bool flat) -> ()", tags=_HOST)
_lib.define("step_end(Tensor(a!) token, int bridge) -> ()", tags=_HOST)
# The device-plan pair (dmi.ring.graphplan): plan_step writes the plan tensors the in-graph
# dmi::capture nodes read (declared mutations order them); commit_step reads the ring after
# them.
_lib.define("plan_step(Tensor(a!) ctrl, Tensor(b!) rows, int bridge, Tensor ref, bool is_ids, Tensor? mask, "
            "Tensor? cache_position, int logits_to_keep) -> ()", tags=_HOST)
_lib.define("commit_step(Tensor(a!) token, Tensor ring, int bridge) -> ()", tags=_HOST)

_BRIDGES: dict[int, object] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def register_bridge(obj, bid: int | None = None) -> int:
    """obj has op_step_begin(ref, is_ids, mask, cache_position), op_capture(hook, x, flat), op_step_end().

    `bid`: a fixed id, for a graph compiled in one process and loaded from a compile cache in
    another, where the id baked into the graph must not depend on registration order."""
    with _lock:
        if bid is None:
            bid = next(_ids)
        _BRIDGES[bid] = obj
    return bid


def unregister_bridge(bid: int, obj=None) -> None:
    """Remove bridge `bid` (only if it is still `obj`, when given)."""
    with _lock:
        if obj is None or _BRIDGES.get(bid) is obj:
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


def _plan_step(ctrl, rows, bridge, ref, is_ids, mask, cache_position, logits_to_keep) -> None:
    b = _BRIDGES.get(bridge)
    if b is not None:
        b.op_plan_step(ref, is_ids, mask, cache_position, logits_to_keep)
    else:  # detached: whatever the graph replays writes nothing
        ctrl.zero_()


def _commit_step(token, ring, bridge) -> None:
    b = _BRIDGES.get(bridge)
    if b is not None:
        b.op_commit_step()


for _name, _fn in (("step_begin", _step_begin), ("capture_host", _capture_host), ("step_end", _step_end),
                   ("plan_step", _plan_step), ("commit_step", _commit_step)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dmi::{_name}")(lambda *a, **k: None)

step_begin = torch.ops.dmi.step_begin.default
capture_host = torch.ops.dmi.capture_host.default
step_end = torch.ops.dmi.step_end.default
plan_step = torch.ops.dmi.plan_step.default
commit_step = torch.ops.dmi.commit_step.default
