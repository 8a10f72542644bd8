"""The payload ring: one byte buffer allocated once at attach, never grown.

Space is handed out in FIFO order and released in the same order (the drain copies
slots out one after another), so a head/tail pair is the whole allocator. A slot
never wraps: if it does not fit before the end, the tail end is skipped.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

ALIGN = 64  # bytes; keeps every slot aligned for any dtype and for wide GPU loads


class PayloadRing:
    def __init__(self, nbytes: int, device: torch.device | str = "cpu"):
        self.capacity = int(nbytes)
        # zeros, not empty: every page is touched now, at attach, so the memory shows in the
        # process (and the engine's accounting) before the KV cache is sized, and the hot path
        # never takes a first-touch page fault.
        self.buffer = torch.zeros(self.capacity, dtype=torch.uint8, device=device)
        # the same bytes as numpy on a CPU: a slice store there costs a fraction of a torch op's
        self._host = self.buffer.numpy() if self.buffer.device.type == "cpu" else None
        self._lock = threading.Condition()
        self._live: deque[tuple[int, int]] = deque()  # (start, end), oldest first
        self._head = 0        # next free byte
        self.high_water = 0
        self.waits = 0        # allocations that had to wait for the drain to free space
        self.closed = False

    @staticmethod
    def aligned(n: int) -> int:
        return (n + ALIGN - 1) // ALIGN * ALIGN

    @property
    def used(self) -> int:
        """Bytes not available to the next slot: live slots, and a skipped end while it lies
        between the oldest slot and the end of the buffer."""
        if not self._live:
            return 0
        tail = self._live[0][0]
        return self._head - tail if self._head > tail else self.capacity - tail + self._head

    def _place(self, n: int) -> int | None:
        """Where an n-byte slot would start now, or None if it doesn't fit."""
        if not self._live:
            return 0 if n <= self.capacity else None
        tail = self._live[0][0]
        if self._head > tail:  # live bytes are [tail, head): free space at both ends
            if self._head + n <= self.capacity:
                return self._head
            return 0 if n <= tail else None  # skip the end of the buffer, start over at 0
        return self._head if self._head + n <= tail else None  # wrapped (or full when equal)

    def alloc(self, nbytes: int, wait: bool, timeout: float | None = None,
              alive=lambda: True, before_wait=None) -> int | None:
        """Reserve nbytes; returns the byte offset, or None if it can't be had.

        wait=True blocks until the drain releases enough space (the `block` policy), for at
        most `timeout` seconds, and gives up early if `alive()` turns false (drain died).
        `before_wait()` runs (outside the lock) once before the first wait: it wakes the drain.
        """
        n = self.aligned(nbytes)
        if n > self.capacity:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        with self._lock:
            while True:
                if self.closed:
                    return None
                start = self._place(n)
                if start is not None:
                    self._live.append((start, start + n))
                    self._head = start + n
                    self.high_water = max(self.high_water, self.used)
                    return start
                if not wait or not alive():
                    return None
                if not waited:
                    waited = True
                    self.waits += 1
                if before_wait is not None:
                    self._lock.release()
                    try:
                        before_wait()
                    finally:
                        self._lock.acquire()
                    before_wait = None
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._lock.wait(0.05 if remaining is None else min(0.05, remaining))

    def could_fit(self, nbytes: int, keep: list[tuple[int, int]]) -> bool:
        """Whether nbytes could be placed once every slot but `keep` ((start, nbytes), oldest
        first: the ones a step still holds) has been released: never wait for space that
        cannot come, a slot never wraps and the held ones stay where they are."""
        n = self.aligned(nbytes)
        if not keep:
            return n <= self.capacity
        tail = keep[0][0]
        head = keep[-1][0] + self.aligned(keep[-1][1])
        if head > tail:
            return head + n <= self.capacity or n <= tail
        return head + n <= tail

    def release(self, start: int) -> None:
        """Free the oldest live slot, which must start at `start` (FIFO)."""
        with self._lock:
            if not self._live or self._live[0][0] != start:
                oldest = self._live[0][0] if self._live else None
                raise RuntimeError(f"payload ring released out of order: {start} != oldest {oldest}")
            self._live.popleft()
            if not self._live:
                self._head = 0
            self._lock.notify_all()

    def zero(self, start: int, nbytes: int) -> None:
        if self._host is not None:
            self._host[start: start + nbytes] = 0
        else:
            self.buffer[start: start + nbytes].zero_()

    def view(self, start: int, nbytes: int) -> torch.Tensor:
        return self.buffer[start: start + nbytes]

    def fill(self) -> float:
        return self.used / self.capacity

    def close(self) -> None:
        """No more slots; the buffer's memory goes back now, not when the session object dies.
        Call once nothing reads the ring any more (the drain has stopped)."""
        with self._lock:
            self.closed = True
            self.buffer = self._host = None
            self._lock.notify_all()
