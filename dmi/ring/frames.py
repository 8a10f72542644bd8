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

    Putting a frame wakes no one but an idle drain: the drain takes everything pending one
    `period` after the first item arrived, so it runs at most ten times a second
    whatever the step rate, each time moving many steps at once, and not at all while idle. On a CPU host every wake-up of another Python thread costs
    the engine's thread a GIL hand-off; fewer, larger hand-overs also mean fewer, larger sink
    writes. A marker, a ring under pressure (`wake`) or a half-full frame ring wakes it at once.
    A producer never waits on a drain that has died (`alive`): the item is refused and the
    caller counts it as dropped.
    """

    def __init__(self, capacity: int = 4096, alive=lambda: True, period: float = 0.1):
        self.capacity = capacity
        self.alive = alive
        self.period = period
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._urgent = False

    def put(self, item, urgent: bool = False) -> bool:
        with self._cv:
            while len(self._items) >= self.capacity:
                if not self.alive():
                    return False
                self._urgent = True
                self._cv.notify_all()
                self._cv.wait(0.05)
            self._items.append(item)
            if urgent or len(self._items) >= self.capacity // 2:
                self._urgent = True
                self._cv.notify_all()
            elif len(self._items) == 1:
                self._cv.notify_all()  # the drain sleeps while nothing is pending: start its clock
            return True

    def wake(self) -> None:
        """The producer needs ring space now: let the drain run."""
        with self._cv:
            self._urgent = True
            self._cv.notify_all()

    def take_all(self, timeout: float | None = None) -> list:
        """Everything pending after one period (sooner when woken; possibly nothing)."""
        with self._cv:
            if not self._items and not self._urgent:  # idle: no wake-ups at all until something arrives
                self._cv.wait_for(lambda: self._items or self._urgent, timeout)
            if not self._urgent:  # let a period's steps gather, so they move in one go
                self._cv.wait_for(lambda: self._urgent, self.period)
            self._urgent = False
            items = list(self._items)
            self._items.clear()
            self._cv.notify_all()
            return items

    def __len__(self) -> int:
        return len(self._items)
