"""The frame ring: the host-side FIFO of sealed frames (dmi.plan.Frame) and control markers,
from the engine's thread to the drain, in the order their payload was written."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Marker:
    """A control item through the pipeline: 'flush' waits until everything before it is written."""

    kind: str
    done: Any = None


class FrameRing:
    """A bounded FIFO of sealed frames, gap records and markers.

    The drain is woken once per step (a frame is put whole, when sealed) and takes everything
    pending in one go: on a CPU host every wake-up of another Python thread costs the engine's
    thread a GIL hand-off, so one per step, not one per hook. A producer never waits on a drain
    that has died (`alive`): the item is refused and the caller counts it as dropped.
    """

    def __init__(self, capacity: int = 4096, alive=lambda: True):
        self.capacity = capacity
        self.alive = alive
        self._items: deque = deque()
        self._cv = threading.Condition()

    def put(self, item) -> bool:
        with self._cv:
            while len(self._items) >= self.capacity:
                if not self.alive():
                    return False
                self._cv.wait(0.05)
            self._items.append(item)
            self._cv.notify_all()
            return True

    def take_all(self, timeout: float | None = None) -> list:
        """Everything pending (after `timeout` seconds, possibly nothing)."""
        with self._cv:
            if not self._items:
                self._cv.wait_for(lambda: self._items, timeout)
            items = list(self._items)
            self._items.clear()
            self._cv.notify_all()
            return items

    def __len__(self) -> int:
        return len(self._items)
