"""What to do when the drain falls behind: the overload policy, decided once per step.

- block: wait for ring space (lossless; the engine waits on the sink), at most BLOCK_TIMEOUT_S
  and only while the drain is alive, then drop and count;
- drop: take the step's frame only if it fits now, else drop it whole (counted, recorded);
- degrade: above `high` ring fill switch to the declared fallback (fewer hooks and rows), back
  below `low`; once reduced, block: the fallback is the declared minimum.

A frame larger than the whole ring can never be placed at once: hooks are kept in spec order
while they fit; under block/degrade the rest are deferred (an eager forward seals the part
written so far and places them in a next part once the drain freed space; a compiled forward
cannot run that Python, so there they are dropped as `oversize`); under drop they are dropped
(`ring_full`).
No step waits for space that cannot exist.
"""
from __future__ import annotations

import logging

log = logging.getLogger("dmi")

BLOCK_TIMEOUT_S = 60.0


class Overload:
    def __init__(self, spec, ring, acct, wake=lambda: None):
        self.wake = wake  # asks the drain to run now (the producer needs space)
        self.mode = spec.overload
        self.degrade = spec.degrade
        self.ring = ring
        self.acct = acct
        self.degraded = False
        self._waits_seen = 0

    def update(self, step: int) -> bool:
        """Degrade hysteresis; returns whether this step captures the fallback only. A step whose
        frame had to wait for ring space counts as a full ring: at step start the drain may just
        have freed the space the engine waited for, so fill alone can stay below `high` while
        every step stalls."""
        if self.degrade is None or self.mode != "degrade":
            return False
        waited = self.ring.waits != self._waits_seen
        self._waits_seen = self.ring.waits
        fill = 1.0 if waited else self.ring.fill()
        d = self.degrade
        if not self.degraded and fill >= d.high:
            self.degraded = True
            self.acct.switched(step, "fallback", fill)
            log.warning("dmi: ring %.0f%% full at step %d: capturing the degrade fallback only", 100 * fill, step)
        elif self.degraded and fill <= d.low:
            self.degraded = False
            self.acct.switched(step, "spec", fill)
        return self.degraded

    def reserve(self, header: int, sizes: list[int], alive, header_only: bool = False
                ) -> tuple[int | None, list[str | None]]:
        """Ring space for one frame: `header` bytes, then each hook's `sizes[i]` (0: nothing to
        write). Returns (offset of the frame or None, per hook None if placed else why not).
        `header_only`: reserve the header even when no hook has planned rows (eager-only hooks
        place their rows during the step and report in it)."""
        from dmi.ring.payload import PayloadRing

        reasons: list[str | None] = [None] * len(sizes)
        total = PayloadRing.aligned(header)
        for i, n in enumerate(sizes):
            if not n:
                continue
            a = PayloadRing.aligned(n)
            if PayloadRing.aligned(header) + a > self.ring.capacity:
                reasons[i] = "oversize"
            elif total + a > self.ring.capacity:
                # The step is larger than the ring: under block/degrade an eager forward places
                # this hook in a later part of the frame once earlier parts drained (Session).
                reasons[i] = "ring_full" if self.mode == "drop" else "deferred"
            else:
                total += a
        if total == PayloadRing.aligned(header) and not header_only:
            return None, [r if s else None for r, s in zip(reasons, sizes)]
        if not alive():  # every hook with rows is dropped as such, oversize or not
            return None, [("drain_stopped" if s else None) for s in sizes]
        off, why = self.reserve_bytes(total, alive)
        if off is None:
            return None, [(r or why) if s else None for r, s in zip(reasons, sizes)]
        return off, reasons

    def reserve_bytes(self, total: int, alive) -> tuple[int | None, str | None]:
        """`total` bytes for a frame known to fit the ring (each hook placed): (offset, None),
        or (None, why not) under this policy."""
        if not alive():
            return None, "drain_stopped"
        off = self.ring.alloc(total, wait=self.mode != "drop", timeout=BLOCK_TIMEOUT_S, alive=alive,
                              before_wait=self.wake)
        if off is None:
            return None, "drain_stopped" if not alive() else "ring_full"
        if self.ring.fill() >= 0.5:
            self.wake()  # half full: drain now rather than on the next tick
        return off, None
