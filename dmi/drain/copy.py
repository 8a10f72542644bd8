"""Making sealed frames readable on the host, before their rows are gathered per hook.

On the CPU the ring is host memory: the frames are read in place (no copy here), and the
drain's per-hook gather is the one host copy of each row. On a GPU the drain thread never
synchronizes the engine's stream: it makes its own stream wait on the event recorded when each
frame was sealed, copies the frames' coalesced byte ranges into a pinned mirror of the ring
(one device-to-host copy per range), waits for that copy's own event, and the gather reads the
mirror.
"""
from __future__ import annotations

import numpy as np
import torch

from dmi.ring.payload import PayloadRing


def coalesce(spans) -> list[tuple[int, int]]:
    """Byte ranges [start, end) covering (offset, nbytes) spans in ring order, adjacent ones merged."""
    ranges: list[list[int]] = []
    for off, n in spans:
        end = off + PayloadRing.aligned(n)
        if ranges and ranges[-1][1] == off:
            ranges[-1][1] = end
        else:
            ranges.append([off, end])
    return [(a, b) for a, b in ranges]


class HostBytes:
    """The copied ranges, addressed by ring offset."""

    def __init__(self, parts: list[tuple[int, int, np.ndarray]]):
        self.parts = parts

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        for a, b, data in self.parts:
            if a <= offset and offset + nbytes <= b:
                return data[offset - a: offset - a + nbytes]
        raise KeyError(f"ring range {offset}+{nbytes} was not copied")


class HostCopy:
    def __init__(self, ring: PayloadRing):
        self.ring = ring
        self._np = None

    def copy(self, frames) -> tuple[HostBytes, int]:
        # numpy, not torch, on this thread: a torch op here would start a second OpenMP team
        # that fights the engine's own for the cores. Views: the ring space is released only
        # after the drain gathered the rows out of it.
        if self._np is None:
            self._np = self.ring.buffer.numpy()
        parts = [(a, b, self._np[a:b]) for a, b in coalesce(s for f in frames for s in f.ranges())]
        return HostBytes(parts), 0


class DeviceCopy:
    def __init__(self, ring: PayloadRing):
        self.ring = ring
        dev = ring.buffer.device
        self.stream = torch.cuda.Stream(dev)
        # A mirror of the ring, so a range lands at its own offset and nothing is allocated per
        # copy; ring space (and so its mirror) is reused only after the rows were taken from it.
        self.pinned = torch.empty(ring.capacity, dtype=torch.uint8, pin_memory=True)
        self.pinned_np = self.pinned.numpy()

    def copy(self, frames) -> tuple[HostBytes, int]:
        events = []
        for f in frames:
            ev = f.done_event
            if ev is not None and (not events or events[-1] is not ev):
                events.append(ev)
        ranges = coalesce(s for f in frames for s in f.ranges())
        with torch.cuda.stream(self.stream):
            for ev in events:
                self.stream.wait_event(ev)
            for a, b in ranges:
                self.pinned[a:b].copy_(self.ring.buffer[a:b], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # this thread waits; the engine's stream never does
        # The gather copies out of the mirror before the ring (and so the mirror) is reused.
        return HostBytes([(a, b, self.pinned_np[a:b]) for a, b in ranges]), sum(b - a for a, b in ranges)


def copier_for(ring: PayloadRing):
    return DeviceCopy(ring) if ring.buffer.device.type == "cuda" else HostCopy(ring)
