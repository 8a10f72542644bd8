"""A file sink's written pages go back to the kernel as soon as they are on disk.

Buffered writes into a new file take a fresh page-cache page for every 4 KiB. Under a
hypervisor that reclaims guest memory left free (free page reporting, ballooning: most cloud
VMs), each fresh page costs a host fault: writing 100 MB into a new file took 200-300 ms of CPU
on the 2-core CI VM, and it competes with the engine for its cores. Starting writeback early
and dropping the pages once it finished keeps the file's page-cache footprint to a few MiB of
pages the kernel hands straight back to the next write: the same 100 MB took 24-35 ms of CPU
(30-50 ms machine-wide, kernel writeback included; docs/decisions.md, "Session 8"). A long run
also stops evicting the rest of the machine's page cache.

Only clean pages are dropped, and nothing waits for the disk: `sync_file_range` with
SYNC_FILE_RANGE_WRITE only starts writeback. Durability is unchanged (a commit was, and is,
about surviving the process, not the machine). Where the calls are missing (not Linux), this
does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("dmi")

# How many bytes a sink writes between two releases: a few MiB of page cache per file at most.
RELEASE_EVERY_BYTES = 4 << 20

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SFR = _sync_file_range()


def supported() -> bool:
    return _SFR is not None


class PageRelease:
    """Counts a file's written bytes; every `every` bytes drops the pages whose writeback
    finished and starts writeback of the rest. `fd` is read on each release (a sink may reopen
    its file); a failure turns releasing off for the file, it never fails a write."""

    def __init__(self, fd_of, every: int = RELEASE_EVERY_BYTES, enabled: bool = True):
        self._fd_of = fd_of
        self.every = every
        self.enabled = bool(enabled) and supported()
        self._since = 0
        self.releases = 0

    def wrote(self, nbytes: int) -> None:
        if not self.enabled:
            return
        self._since += nbytes
        if self._since >= self.every:
            self.release()

    def release(self) -> None:
        if not self.enabled:
            return
        self._since = 0
        try:
            fd = self._fd_of()
            # first drop what the last release's writeback finished, then start the next
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if _SFR(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            self.releases += 1
        except Exception as e:  # a filesystem without them: write as before
            self.enabled = False
            log.info("dmi: not releasing written pages early (%s: %s)", type(e).__name__, e)


def release_file(path: str, enabled: bool = True) -> None:
    """The same for a file already closed (a finished shard): start its writeback, drop what
    is clean."""
    if not (enabled and supported()):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        PageRelease(lambda: fd).release()
    finally:
        os.close(fd)
