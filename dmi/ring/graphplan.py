"""Capture inside CUDA graphs: the step's plan lives in device tensors the graph reads.

A replayed CUDA graph runs no Python, so no hook can decide per step where rows go. Instead:
- a host op before the graph (`dmi::plan_step`, cudagraph-unsafe, so inductor's graph
  partitioning keeps it outside the graph) builds the step's row table, allocates ring space
  for every hook and uploads (enabled, offset, count) per hook plus the kept source rows into
  fixed device tensors, with async copies on the compute stream;
- inside the graph each capture point is a `dmi::capture(ring, x, rows[group], ctrl, hook)`
  node with fixed addresses: the same recorded kernel writes each step where the plan says,
  and nothing when the plan disabled it (a dropped frame);
- a host op after the graph (`dmi::commit_step`) hands the slots to the drain and seals the
  frame with an event; the drain never synchronizes the compute stream.

Row shapes come from the adapter's bindings (Binding.row_shape/dtype), fixed at attach: a
replayed graph cannot report shapes back. A capture point holds all of a batch row's tokens
(group 0) or only the last one (group 1: logits under `logits_to_keep=1`); the adapter says
which for each step. The trace checks each tensor against its binding and refuses to compile
a capture point that does not match, rather than write a wrong plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmi.kernels.capture_op import CTRL_WIDTH

from .frames import Slot

MAX_ROWS = 8192     # token rows one compiled step can plan; more are recorded as gaps ("plan_overflow")
ALL, LAST = 0, 1    # row groups: every token of each batch row, or the last one only


def group(rows: int, batch: int, tokens: int) -> int | None:
    """The row group of a capture tensor with `rows` rows in a [batch, tokens] step."""
    t = rows // batch if batch else 0
    return ALL if t == tokens else LAST if t == 1 else None


@dataclass
class _Planned:
    hook: int
    offset: int | None   # None: not written this step, for `reason`
    nbytes: int
    sel: object
    reason: str | None = None  # why not planned: graph_shape, plan_overflow, sink_error; None: ring full


class GraphPlan:
    def __init__(self, session, max_rows: int = MAX_ROWS):
        self.session = session
        n = len(session.bindings)
        dev = session.ring.buffer.device
        self.max_rows = max_rows
        self.ctrl = torch.zeros((n, CTRL_WIDTH), dtype=torch.int64, device=dev)
        self.rows = torch.zeros((2, max_rows), dtype=torch.int64, device=dev)
        self._ctrl_host = np.zeros((n, CTRL_WIDTH), dtype=np.int64)
        if dev.type == "cuda":
            # Static inputs of the graph: never copied on replay, and mutation of them is allowed.
            for t in (session.ring.buffer, self.ctrl, self.rows):
                torch._dynamo.mark_static_address(t)
        self._planned: list[_Planned] = []

    def check(self, hook: int, rows_x: torch.Tensor) -> None:
        """Trace time: the tensor a capture point sees must be what its binding declared."""
        b = self.session.bindings[hook]
        if b.row_shape is None or b.dtype is None:
            raise ValueError(f"dmi: {b.name} has no row shape known at attach, which capture inside CUDA "
                             f"graphs needs; capture it in eager mode or drop it from the spec")
        if tuple(rows_x.shape[1:]) != tuple(b.row_shape) or rows_x.dtype != b.dtype:
            raise ValueError(f"dmi: {b.name}: a compiled step sees rows of shape {tuple(rows_x.shape[1:])} "
                             f"{rows_x.dtype}, the binding declared {tuple(b.row_shape)} {b.dtype}")

    # -- every step, on the host, before the graph ---------------------------------------
    def plan(self, last_only: frozenset[int] = frozenset()) -> None:
        """`last_only`: hooks that hold only each batch row's last token this step."""
        from dmi.session import BLOCK_TIMEOUT_S

        s = self.session
        plan = s.plan
        T = plan.rows.tokens
        if s._on_gpu:
            s._track_stream(plan)
        self._planned.clear()
        ctrl = self._ctrl_host
        ctrl[:] = 0
        groups = {ALL: plan.select(T), LAST: plan.select(1)}
        overflow = any(len(g.src_rows) > self.max_rows for g in groups.values())
        for i, b in enumerate(s.bindings):
            row_bytes = b.row_bytes if b.row_shape is not None else 0
            sel = plan.select(1 if i in last_only else T, in_fallback=i in s.fallback_hooks)
            n = len(sel.token_idx)
            off, reason = None, None
            if not row_bytes:
                reason = "graph_shape"
            elif overflow:
                reason = "plan_overflow"
            elif s.drain.sink_failed is not None:
                reason = "sink_error"
            elif n:
                off = s.ring.alloc(n * row_bytes, wait=s.spec.overload != "drop", timeout=BLOCK_TIMEOUT_S,
                                   alive=s.drain.alive, before_wait=s.frames.seal)
                if off is not None:
                    ctrl[i] = (1, off, n)
            self._planned.append(_Planned(i, off, n * row_bytes, sel, reason))
        self._upload(groups, overflow)

    def _upload(self, groups: dict, overflow: bool) -> None:
        up = self.session._upload
        if up is None:  # CPU: the op reads host memory directly
            self.ctrl.copy_(torch.from_numpy(self._ctrl_host))
            if not overflow:
                for g, sel in groups.items():
                    self.rows[g, : len(sel.src_rows)] = sel.src_rows
            return
        up.put(self._ctrl_host.reshape(-1), into=self.ctrl.view(-1))
        if not overflow:
            for g, sel in groups.items():
                if len(sel.src_rows):
                    up.put(sel.src_rows.numpy(), into=self.rows[g, : len(sel.src_rows)])

    # -- every step, on the host, after the graph ----------------------------------------
    def commit(self) -> None:
        s = self.session
        plan = s.plan
        if plan is None:
            return
        T = plan.rows.tokens
        for p in self._planned:
            name = s.names[p.hook]
            sel = p.sel
            b = s.bindings[p.hook]
            if len(sel.lost_idx):
                s._gap(name, sel.lost_idx, plan, "degraded")
            if not len(sel.token_idx):
                s.acct.captured(name, sel.produced, sel.filtered, 0, 0)
                continue
            if p.offset is None:
                if p.reason == "sink_error":
                    s.acct.dropped(name, len(sel.token_idx), "sink_error", produced=sel.produced,
                                   filtered=sel.filtered)
                elif p.reason is not None:
                    s._gap(name, sel.token_idx, plan, p.reason, produced=sel.produced, filtered=sel.filtered)
                else:
                    s._drop(name, sel, plan, p.nbytes)
                continue
            info = s._info_from(p.hook, b.dtype, tuple(b.row_shape))
            s.acct.captured(name, sel.produced, sel.filtered, len(sel.token_idx), p.nbytes)
            s.frames.put(Slot(plan, p.hook, p.offset, p.nbytes, tuple(b.row_shape), b.dtype, sel.token_idx,
                              pattern_batch=sel.token_idx // T if info.ragged else None))
        self._planned.clear()
