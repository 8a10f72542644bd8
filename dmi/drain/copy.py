"""Copy-out of sealed frames from the payload ring to host memory, one copy per frame or fewer.

Frames lie back to back in the ring, so the byte ranges of the frames taken in one wake-up are
coalesced and each range is copied once. On the CPU the ring is host memory: numpy copies the
range. On a GPU the drain thread never synchronizes the engine's stream: it makes its own stream
wait on the event recorded when each frame was sealed, copies the ranges into a pinned mirror of
the ring, waits for that copy's own event, and takes the bytes from the mirror.
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

    def copy(self, frames) -> tuple[HostBytes, int]:
        # numpy, not torch, on this thread: a torch op here would start a second OpenMP team
        # that fights the engine's own for the cores.
        buf = self.ring.buffer.numpy()
        parts = [(a, b, buf[a:b].copy()) for a, b in coalesce(s for f in frames for s in f.ranges())]
        return HostBytes(parts), sum(b - a for a, b, _ in parts)


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
        parts = [(a, b, self.pinned_np[a:b].copy()) for a, b in ranges]
        return HostBytes(parts), sum(b - a for a, b in ranges)


def copier_for(ring: PayloadRing):
    return DeviceCopy(ring) if ring.buffer.device.type == "cuda" else HostCopy(ring)
