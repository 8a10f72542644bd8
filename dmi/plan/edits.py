"""The per-step edit table: which token rows each edit point changes, and with which value row.

Made once per step in begin_step, vectorised over rows, before the forward: for each
intervention the rows its request and token filters keep (for `patch`, those whose position the
stored run has), written into one int64 table [points, capacity] whose storage stays fixed, so
a compiled graph or a CUDA graph reads each step's table through the same tensor. -1 means
"no edit". On the GPU the host table goes up with one async copy, like the capture plan.
"""
from __future__ import annotations

import numpy as np
import torch

from dmi.errors import DmiError

from .control import ROW_CAPACITY
from .rows import RowTable


class InterventionError(DmiError):
    """An armed intervention cannot be applied to a step; the step is refused, never run unsteered."""


class EditTable:
    """sel: int64 [capacity, points], row-major so a step's n rows are one contiguous block (one
    small upload on the GPU); point p of a tensor of n rows reads sel[:n, p]."""

    def __init__(self, n_points: int, device: torch.device, capacity: int = ROW_CAPACITY, grows: bool = True):
        self.n_points = max(n_points, 1)
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.grows = grows and not self.on_gpu
        self.used = 0  # rows the last plan wrote (reset to -1 by the next plan or disarm)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        if self.on_gpu:
            from dmi.ring.upload import PinnedUpload

            self.host = np.full((capacity, self.n_points), -1, dtype=np.int64)
            self.sel = torch.full((capacity, self.n_points), -1, dtype=torch.int64, device=self.device)
            torch._dynamo.mark_static_address(self.sel)
            self._upload = PinnedUpload(self.device, entries=max(4 * self.host.size, 1 << 16))
        else:
            self.sel = torch.full((capacity, self.n_points), -1, dtype=torch.int64)
            self.host = self.sel.numpy()  # same memory: the op reads what the plan wrote

    def fits(self, n: int) -> bool:
        """A CPU table grows where the graph reads it through the session each call (HF: a
        compiled CPU graph takes the new tensor as its input); a GPU table, or one an engine's
        graph holds for its lifetime (vLLM), is fixed."""
        if n <= self.capacity:
            return True
        if not self.grows:
            return False
        self._alloc(max(n, 2 * self.capacity))
        return True

    def send(self, n: int) -> None:
        """Make rows [:n] visible to kernels enqueued after this call."""
        if self.on_gpu and n:
            self._upload.put(self.host[:n].reshape(-1), into=self.sel[:n].view(-1))


class EditPlanner:
    """Made at attach from the interventions' row filters and value positions."""

    def __init__(self, filters: list, sources: list[np.ndarray | None], slots: list[list[int]], device,
                 capacity: int = ROW_CAPACITY, grows: bool = True, extra: int = 0):
        """extra: columns after the interventions' that a `more` planner fills (served banks)."""
        self.filters = filters      # per intervention: RowFilter (its requests and tokens)
        self.sources = sources      # per intervention: stored positions (patch), sorted, or None
        self.slots = slots          # per intervention: its edit points' rows in the table
        self.table = EditTable(sum(len(s) for s in slots) + extra, device, capacity, grows)
        self._cols = [np.asarray(s, dtype=np.int64) for s in slots]

    def rows_of(self, step: int, rows: RowTable) -> list[np.ndarray]:
        """Per intervention, the rows of `rows` it selects (patch: where the run has a row)."""
        out = []
        for filt, src in zip(self.filters, self.sources):
            on = np.flatnonzero(filt.keep(step, rows)[0])
            if src is not None:
                at = np.minimum(np.searchsorted(src, rows.position[on]), len(src) - 1)
                on = on[src[at] == rows.position[on]]
            out.append(on)
        return out

    def plan(self, step: int, rows: RowTable, more=None) -> list[np.ndarray]:
        """Fill the table for this step's token rows; returns, per intervention, the rows it edits
        (then what `more(step, rows, host)` returns: it fills the extra columns)."""
        n = rows.n_rows
        t = self.table
        if not t.fits(n):
            raise InterventionError(
                f"dmi: a step of {n} token rows is larger than the fixed edit table ({t.capacity} rows); "
                f"its armed interventions cannot be applied, so the step is refused rather than run unsteered")
        host = t.host
        host[: max(t.used, n)] = -1
        applied = self.rows_of(step, rows)
        for on, src, cols in zip(applied, self.sources, self._cols):
            if src is None:
                host[on[:, None], cols] = 0
            else:  # each patched row takes the stored row at its position
                host[on[:, None], cols] = np.searchsorted(src, rows.position[on])[:, None]
        if more is not None:
            applied = applied + more(step, rows, host)
        t.send(max(t.used, n))
        t.used = n
        return applied

    def disarm(self) -> None:
        """Between steps nothing is edited: a stray forward (or a step refused) runs unedited
        and says so (the books)."""
        t = self.table
        if t.used:
            t.host[: t.used] = -1
            t.send(t.used)
            t.used = 0
