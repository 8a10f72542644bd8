"""The frame ring: the host-side FIFO of sealed frames (dmi.plan.Frame) and control markers,
from the engine's thread to the drain, in the order their payload was written."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Marker:
    """A control item through the pipeline: 'flush' waits until everything before it is written."""

    kind: str
    done: Any = None


# A pause is this many typical step intervals without a new frame, within these bounds: long
# enough that the gap between two steps is not one, short enough that the end of a generate is.
_PAUSE_STEPS = 3.0
_MIN_PAUSE_S = 0.05
_MAX_PAUSE_S = 0.5
# Streaming: a batch the drain takes should hold at least this many ring bytes, however long
# that takes up to `max_period`. Each take costs a wake-up, a gather and a sink call per hook
# (several hundred us of Python and h5py) whatever it moves, on the cores the engine uses; at
# batch 1 a 0.1 s period moved ~0.4 MB a take, so those fixed costs were most of the drain's
# and the sink's work (docs/decisions.md, "Session 9").
_BATCH_BYTES = 2 << 20


class FrameRing:
    """A bounded FIFO of sealed frames, gap records and markers.

    When the drain takes what is pending (`take_all`) is the drain schedule (`drain.schedule`):
    - streaming (`pause=False`, the default): one `period` after the first item arrived, or
      later, once `batch_bytes` of frames are pending or the oldest is `max_period` old, so it
      runs at most ten times a second whatever the step rate, each time moving many steps at
      once (a slow trickle of small steps waits to make a batch worth its fixed costs), and
      not at all while idle;
    - at pauses (`pause=True`): once the engine stops producing frames for a few step
      intervals (the end of a generate, a server between batches), or the oldest pending item
      is `max_delay` seconds old. On a CPU engine the drain and sink threads share the cores
      the engine's own threads use; this moves their work out of its steps, at the cost of
      rows reaching the sink later.
    Putting a frame wakes no one but an idle drain: every wake-up of another Python thread
    costs the engine's thread a GIL hand-off. A marker, a ring under pressure (`urgent`,
    `wake`) or a half-full frame ring wakes it at once. A producer never waits on a drain that
    has died (`alive`): the item is refused and the caller counts it as dropped.
    """

    def __init__(self, capacity: int = 4096, alive=lambda: True, period: float = 0.1, pause: bool = False,
                 max_delay: float = 5.0, batch_bytes: int = _BATCH_BYTES, max_period: float = 1.0):
        self.capacity = capacity
        self.alive = alive
        self.period = period
        self.pause = pause
        self.max_delay = max_delay
        self.batch_bytes = batch_bytes
        self.max_period = max(max_period, period)
        self._pending = 0      # ring bytes of the pending frames
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._urgent = False
        self._first = 0.0      # when the oldest pending item arrived
        self._last = 0.0       # when the newest did
        self._interval = 0.0   # typical time between two items while the engine runs

    def put(self, item, urgent: bool = False) -> bool:
        with self._cv:
            while len(self._items) >= self.capacity:
                if not self.alive():
                    return False
                self._urgent = True
                self._cv.notify_all()
                self._cv.wait(0.05)
            now = time.monotonic()
            gap = now - self._last
            if gap < _MAX_PAUSE_S:  # between two steps, not after a pause
                self._interval = gap if not self._interval else 0.8 * self._interval + 0.2 * gap
            self._last = now
            self._items.append(item)
            nbytes = _ring_bytes(item)
            self._pending += nbytes
            if len(self._items) == 1:
                self._first = now
            if urgent or len(self._items) >= self.capacity // 2:
                self._urgent = True
                self._cv.notify_all()
            elif len(self._items) == 1:
                self._cv.notify_all()  # the drain sleeps while nothing is pending: start its clock
            elif self._pending >= self.batch_bytes > self._pending - nbytes:
                self._cv.notify_all()  # a batch's worth: the drain may be waiting past its period for it
            return True

    def wake(self) -> None:
        """The producer needs ring space now: let the drain run."""
        with self._cv:
            self._urgent = True
            self._cv.notify_all()

    def take_all(self, timeout: float | None = None) -> list:
        """Everything pending once the schedule says so (sooner when woken; possibly nothing)."""
        with self._cv:
            if not self._items and not self._urgent:  # idle: no wake-ups at all until something arrives
                self._cv.wait_for(lambda: self._items or self._urgent, timeout)
            if self.pause:
                self._await_pause()
            elif not self._urgent:  # let a period's steps gather, so they move in one go
                self._cv.wait_for(lambda: self._urgent, self.period)
                if self._items and self._pending < self.batch_bytes:
                    left = self._first + self.max_period - time.monotonic()
                    self._cv.wait_for(lambda: self._urgent or self._pending >= self.batch_bytes, max(left, 0.0))
            self._urgent = False
            items = list(self._items)
            self._items.clear()
            self._pending = 0
            self._cv.notify_all()
            return items

    def _await_pause(self) -> None:
        """Wait (holding the condition) until the producer pauses, the oldest item is
        max_delay old, or something is urgent. Puts do not wake this wait: it sleeps until
        the pause it expects, then looks again."""
        while self._items and not self._urgent:
            quiet = min(max(_PAUSE_STEPS * self._interval, _MIN_PAUSE_S), _MAX_PAUSE_S)
            deadline = min(self._last + quiet, self._first + self.max_delay)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def __len__(self) -> int:
        return len(self._items)


def _ring_bytes(item) -> int:
    """Ring bytes a pending item holds: a frame's planned rows and its eager-only slots."""
    ranges = getattr(item, "ranges", None)
    return sum(n for _, n in ranges()) if ranges is not None else getattr(item, "nbytes", 0)
