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

    def put(self, values: np.ndarray, into: torch.Tensor | None = None) -> torch.Tensor:
        """`values` on the device, valid for kernels enqueued after this call on the current
        stream: in a slice of the staging buffer, or in `into` (a fixed device tensor of the
        same length, e.g. a CUDA graph's plan)."""
        n = len(values)
        if n > self.entries:  # larger than the whole staging ring: a one-off pinned tensor
            host = torch.from_numpy(np.ascontiguousarray(values, np.int64)).pin_memory()
            if into is None:
                return host.to(self.device, non_blocking=True)
            return into.copy_(host, non_blocking=True)
        if self._head + n > self.entries:
            self._head = 0
        a, b = self._head, self._head + n
        while self._inflight and self._inflight[0][0] < b and a < self._inflight[0][1]:
            self._inflight.popleft()[2].synchronize()
        self.host_np[a:b] = values
        out = self.dev[a:b] if into is None else into
        out.copy_(self.host[a:b], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._inflight.append((a, b, ev))
        self._head = b
        return out
