from __future__ import annotations

import threading
from collections import deque


EMPTY = object()


class ByteBoundedQueue:
    """FIFO bounded by the bytes it holds: host staging between drain and sink.

    When the sink falls behind, the drain blocks here, the payload ring fills, and the
    overload policy decides at the producer. One item larger than the bound still passes
    when the queue is empty, so nothing can wedge.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: deque = deque()
        self._cv = threading.Condition()

    def put(self, item, nbytes: int = 0) -> None:
        with self._cv:
            while self._items and self.bytes + nbytes > self.max_bytes:
                self._cv.wait()
            self._items.append((item, nbytes))
            self.bytes += nbytes
            self._cv.notify_all()

    def get(self, timeout: float | None = None):
        """The oldest item; `EMPTY` if `timeout` seconds pass with none."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._items, timeout):
                return EMPTY
            item, nbytes = self._items.popleft()
            self.bytes -= nbytes
            self._cv.notify_all()
            return item
