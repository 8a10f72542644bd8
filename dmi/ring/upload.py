"""Small host->device uploads (row indices, frame plans) that never synchronize the engine.

Values go into a pinned host ring and travel with one async copy on the engine's current
stream, so they arrive before any kernel enqueued after them reads them. A host region is
written again only after the copy that read it has completed (its event; in practice long
since, the ring holds many steps).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch


class PinnedUpload:
    def __init__(self, device: torch.device, entries: int = 1 << 17):
        self.entries = entries
        self.host = torch.empty(entries, dtype=torch.int64, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.empty(entries, dtype=torch.int64, device=device)
        self.device = device
        self._head = 0
        self._inflight: deque[tuple[int, int, torch.cuda.Event]] = deque()

    def put_into(self, dst: torch.Tensor, values: np.ndarray) -> None:
        """Write `values` into the fixed device tensor `dst` (same length), stream-ordered."""
        self._send(values, dst)

    def put(self, values: np.ndarray) -> torch.Tensor:
        """A device int64 tensor holding `values`, valid for kernels enqueued after this call
        on the current stream."""
        n = len(values)
        if n > self.entries:  # larger than the whole staging ring: a one-off pinned tensor
            return torch.from_numpy(np.ascontiguousarray(values, np.int64)).pin_memory().to(self.device,
                                                                                          non_blocking=True)
        return self._send(values, None)

    def _send(self, values: np.ndarray, dst: torch.Tensor | None) -> torch.Tensor:
        n = len(values)
        if n > self.entries:
            dst.copy_(torch.from_numpy(np.ascontiguousarray(values, np.int64)).pin_memory(), non_blocking=True)
            return dst
        if self._head + n > self.entries:
            self._head = 0
        a, b = self._head, self._head + n
        while self._inflight and self._inflight[0][0] < b and a < self._inflight[0][1]:
            self._inflight.popleft()[2].synchronize()
        self.host_np[a:b] = values
        out = self.dev[a:b] if dst is None else dst
        out.copy_(self.host[a:b], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._inflight.append((a, b, ev))
        self._head = b
        return out
