"""The plan's control tables, where the capture op reads them.

ctrl: int64 [hooks, CTRL_WIDTH] (kernels/capture_op.py says what each column is); rows: int64
[groups, capacity], the source rows of each row group. On a CPU they are host tensors the op
reads directly. On a GPU they are fixed device tensors (static addresses a CUDA graph keeps):
the host fills one pinned buffer per step and sends it with one async copy on the compute
stream, so kernels enqueued after it read this step's plan and the host never waits.
"""
from __future__ import annotations

import numpy as np
import torch

from dmi.kernels.capture_op import CTRL_WIDTH

ROW_CAPACITY = 8192  # source rows per group a GPU plan holds; more are recorded (plan_overflow)


class ControlTable:
    upload_entries: int | None = None  # GPU staging ring size override (tests: make it wrap often)

    def __init__(self, n_hooks: int, n_groups: int, device: torch.device, capacity: int = ROW_CAPACITY):
        self.n_hooks, self.n_groups = n_hooks, max(n_groups, 1)
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.capacity = capacity
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        size = self.n_hooks * CTRL_WIDTH + self.n_groups * capacity
        if self.on_gpu:
            from dmi.ring.upload import PinnedUpload

            self.host = np.zeros(size, dtype=np.int64)
            self.dev = torch.zeros(size, dtype=torch.int64, device=self.device)
            self._upload = PinnedUpload(self.device, entries=self.upload_entries or max(4 * size, 1 << 17))
            buf = self.dev
            torch._dynamo.mark_static_address(self.dev)
        else:
            buf = torch.zeros(size, dtype=torch.int64)
            self.host = buf.numpy()  # same memory: numpy stores cost 0.1 us, tensor stores 2 us
        k = self.n_hooks * CTRL_WIDTH
        self.ctrl = buf[:k].view(self.n_hooks, CTRL_WIDTH)
        self.rows = buf[k:].view(self.n_groups, capacity)
        self.ctrl_np = self.host[:k].reshape(self.n_hooks, CTRL_WIDTH)
        self.rows_np = self.host[k:].reshape(self.n_groups, capacity)

    def add_groups(self, n: int) -> None:
        """n more source-row lists (new tensors: call it before any graph has captured them)."""
        self.n_groups += n
        self._alloc(self.capacity)

    def fits(self, n: int) -> bool:
        """Whether a group of n source rows can be planned. A CPU plan grows (the op reads host
        memory; a compiled CPU graph sees the new tensor through its inputs); a GPU plan is fixed."""
        if n <= self.capacity:
            return True
        if self.on_gpu:
            return False
        self._alloc(max(n, 2 * self.capacity))
        return True

    def send(self) -> None:
        """Make the host's plan visible to the kernels enqueued after this call."""
        if self.on_gpu:
            self._upload.put(self.host, into=self.dev)

    def send_row(self, hook: int) -> None:
        """Only hook's ctrl row changed (an eager-only capture placed during the step)."""
        if self.on_gpu:
            self._upload.put(self.ctrl_np[hook], into=self.ctrl[hook])
