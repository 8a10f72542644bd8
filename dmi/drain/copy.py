"""Copy-out of sealed slots from the payload ring to host memory.

On the CPU the ring is host memory: numpy copies each slot. On a GPU the drain thread never
synchronizes the engine's stream: it makes its own stream wait on an event recorded on the
engine's stream after the slots' kernels, copies the covered ring ranges (coalesced: slots
of one step lie back to back) into a pinned mirror of the ring, waits for that copy's own
event, and only then hands the rows on and frees the ring space.
"""
from __future__ import annotations

import numpy as np
import torch

from dmi.ring.payload import PayloadRing


def coalesce(slots) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the ring covering `slots` (in ring order), adjacent slots merged."""
    ranges: list[list[int]] = []
    for s in slots:
        end = s.offset + PayloadRing.aligned(s.nbytes)
        if ranges and ranges[-1][1] == s.offset:
            ranges[-1][1] = end
        else:
            ranges.append([s.offset, end])
    return [(a, b) for a, b in ranges]


class HostCopy:
    def __init__(self, ring: PayloadRing):
        self.ring = ring

    def copy(self, slots) -> list[np.ndarray]:
        # numpy, not torch, on this thread: a torch op here would start a second OpenMP team
        # that fights the engine's own for the cores.
        return [self.ring.view(s.offset, s.nbytes).numpy().copy() for s in slots]


class DeviceCopy:
    def __init__(self, ring: PayloadRing):
        self.ring = ring
        dev = ring.buffer.device
        self.stream = torch.cuda.Stream(dev)
        # A mirror of the ring, so a slot lands at its own offset and nothing needs allocating
        # per copy; ring space (and so its mirror) is reused only after this copy completed.
        self.pinned = torch.empty(ring.capacity, dtype=torch.uint8, pin_memory=True)
        self.pinned_np = self.pinned.numpy()

    def copy(self, slots) -> list[np.ndarray]:
        events = []
        for s in slots:
            ev = s.plan.done_event
            if ev is None:  # not sealed yet (a `block` wait sealed early): everything the
                # producer enqueued before putting the slot is before this point of its stream
                ev = torch.cuda.Event()
                ev.record(s.plan.stream)
                s.plan.done_event = ev
            if not events or events[-1] is not ev:
                events.append(ev)
        with torch.cuda.stream(self.stream):
            for ev in events:
                self.stream.wait_event(ev)
            for a, b in coalesce(slots):
                self.pinned[a:b].copy_(self.ring.buffer[a:b], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # this thread waits; the engine's stream never does
        return [self.pinned_np[s.offset: s.offset + s.nbytes].copy() for s in slots]


def copier_for(ring: PayloadRing):
    return DeviceCopy(ring) if ring.buffer.device.type == "cuda" else HostCopy(ring)
