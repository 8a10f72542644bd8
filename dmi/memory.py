"""Is there memory for the payload ring? Asked at attach, before the ring is allocated, so that
a mistyped `ring.bytes` is a SpecError naming the field instead of an allocator's error (or the
host swapping itself to death: on the CPU the ring is zero-filled, every page touched)."""
from __future__ import annotations

import os

import torch

from dmi.errors import SpecError


def available_bytes(device: torch.device | str) -> tuple[int, str] | None:
    """(bytes free for a new allocation on `device`, what was measured), or None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    if device.type == "cpu":
        avail = _meminfo_available()
        if avail is not None:
            return avail, "host memory available (MemAvailable)"
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory"
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_ring_fits(nbytes: int, device: torch.device | str) -> None:
    """Raise SpecError("ring.bytes") when the ring cannot be allocated on `device`."""
    found = available_bytes(device)
    if found is None:
        return
    avail, what = found
    if nbytes > avail:
        raise SpecError("ring.bytes", f"{nbytes} bytes ({human_bytes(nbytes)}) is more than the {what}: "
                                      f"{avail} bytes ({human_bytes(avail)}); the ring is one allocation on the "
                                      f"model's device ({torch.device(device)}), so give ring.bytes a size that "
                                      f"fits there (default 256 MiB)")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            break
        n /= 1024
    else:
        unit = "PiB"
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
