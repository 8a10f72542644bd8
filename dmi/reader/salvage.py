"""What survives of a truncated run file: `dmi.open(path, salvage=True)`.

A file cut short (a copy interrupted, a full disk, a partial download) fails HDF5's own
check that the file is as long as its superblock says. Most of what a dmi file holds is row
data, appended chunk by chunk, so the cut usually takes only the newest chunks. Salvage
presents the file to HDF5 padded with zeros to its recorded length, then trusts a hook's rows
only up to the first chunk (of the data or of an index column) that reaches past the cut, and
the request ids and gaps up to the first that no longer read back.

HDF5 keeps one index for the whole file, though: when the cut took metadata that the rest
depends on (the root group, a dataset's chunk index), nothing can be read, and salvage says so.
Reading garbage metadata can crash the HDF5 library itself, so the file is first probed in a
child process; only a probe that finished cleanly lets this process open it.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from typing import Any

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PROBE_TIMEOUT_S = 120.0

# Where a run should go when its files may be cut short: self-contained shards lose only
# the last one (DESIGN.md, "Past one machine").
OTHER_FORMAT = ("the dataset sink (Parquet shards with a manifest) writes self-contained shards, so a file "
                "cut short there loses only its last shard; capture to it where files can be cut")


def recorded_length(path: str) -> int | None:
    """The end-of-file address a version 2/3 superblock records (dmi writes version 2), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(48)
    except OSError:
        return None
    if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
        return None
    size_of_offsets = head[9]
    if size_of_offsets not in (4, 8) or len(head) < 12 + 3 * size_of_offsets:
        return None
    fmt = "<3I" if size_of_offsets == 4 else "<3Q"
    _base, _ext, eof = struct.unpack_from(fmt, head, 12)
    return int(eof)


def truncation(path: str) -> tuple[int, int] | None:
    """(bytes present, bytes recorded) when the file is shorter than its superblock says."""
    eof = recorded_length(path)
    if eof is None:
        return None
    size = os.path.getsize(path)
    return (size, eof) if size < eof else None


class PaddedFile(io.RawIOBase):
    """The file as HDF5 expects it: its bytes, then zeros up to the recorded length."""

    def __init__(self, path: str, length: int) -> None:
        self._f = open(path, "rb")
        self.real = os.fstat(self._f.fileno()).st_size
        self.length = max(length, self.real)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        end = min(self._pos + len(buf), self.length)
        n = max(0, end - self._pos)
        if n == 0:
            return 0
        view = memoryview(buf)[:n]
        have = 0
        if self._pos < self.real:
            self._f.seek(self._pos)
            have = self._f.readinto(view[:min(n, self.real - self._pos)]) or 0
        view[have:] = bytes(n - have)
        self._pos = end
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_padded(path: str, length: int):
    import h5py

    raw = PaddedFile(path, length)
    try:
        return h5py.File(raw, "r"), raw
    except BaseException:
        raw.close()
        raise


def _rows_before_cut(ds, cut: int, ragged: bool) -> int:
    """Rows of `ds` whose chunks all lie before byte `cut` (leading rows only)."""
    n = int(ds.shape[0])
    if n == 0:
        return 0
    if ds.chunks is None:  # contiguous: one extent
        off = ds.id.get_offset()
        return n if off is not None and off + ds.id.get_storage_size() <= cut else 0
    per = ds.chunks[0]
    ok: dict[int, bool] = {}
    for i in range(ds.id.get_num_chunks()):
        info = ds.id.get_chunk_info(i)
        start = int(info.chunk_offset[0])
        inside = info.byte_offset is not None and info.byte_offset + info.size <= cut
        ok[start] = ok.get(start, True) and inside
    for start in range(0, n, per):
        # A ragged hook's narrow early rows never touched the chunks of later, wider columns.
        if not ok.get(start, ragged):
            return start
    return n


def _readable_prefix(ds, n: int) -> int:
    """The longest prefix ds[:k] (k <= n) of a variable-length string column that reads back."""
    def reads(k: int) -> bool:
        try:
            ds.asstr()[:k]
            return True
        except (OSError, RuntimeError, ValueError, UnicodeDecodeError):
            return False

    if n == 0 or reads(n):
        return n
    lo, hi = 0, n  # reads(lo) holds, reads(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reads(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _before_unknown_request(column, n: int, requests: int) -> int:
    """Leading rows (of the first n) whose request index names one of the `requests` readable ids."""
    import numpy as np

    if n == 0:
        return 0
    beyond = np.flatnonzero(column[:n] >= requests)
    return int(beyond[0]) if beyond.size else n


def probe(path: str) -> dict[str, Any]:
    """Open the padded file and measure what survives. Runs in a child process."""
    size, eof = truncation(path) or (os.path.getsize(path), os.path.getsize(path))
    f, raw = open_padded(path, eof)
    try:
        hooks: dict[str, int] = {}
        lost: dict[str, str] = {}
        for name in f["hooks"]:
            try:  # a hook whose group header was cut (never committed) is lost; the others are not
                grp = f["hooks"][name]
                ragged = bool(grp.attrs.get("ragged", False))
                hooks[name] = min(_rows_before_cut(grp[c], size, ragged and c == "data")
                                  for c in ("data", "request", "position", "step"))
            except (OSError, KeyError, RuntimeError, ValueError) as e:
                hooks[name] = 0
                lost[name] = " ".join(str(e).split())
        requests = _readable_prefix(f["requests"], int(f["requests"].shape[0]))
        for name, n in hooks.items():
            if n:  # rows are kept up to the first whose request id did not survive
                hooks[name] = _before_unknown_request(f["hooks"][name]["request"], n, requests)
        g = f["gaps"]
        gaps = min(_rows_before_cut(g[c], size, False) for c in ("request", "position", "step"))
        gaps = min(_readable_prefix(g["hook"], gaps), _readable_prefix(g["reason"], gaps))
        gaps = _before_unknown_request(g["request"], gaps, requests)
        for key in ("format", "spec", "model_config", "json_attrs"):
            f.attrs.get(key)  # the root attributes must read back too
        return {"size": size, "length": eof, "hooks": hooks, "requests": requests, "gaps": gaps, "lost": lost}
    finally:
        f.close()
        raw.close()


def salvage_limits(path: str, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """What of the truncated file at `path` can be read, measured in a child process; raises
    RunFileError saying why when nothing can."""
    from dmi.errors import RunFileError

    cut = truncation(path)
    where = f"{cut[0]} of its {cut[1]} bytes are present" if cut else "it is damaged"
    try:
        # This file as a script: the child needs h5py, not dmi (or torch).
        r = subprocess.run([sys.executable, os.path.abspath(__file__), path], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFileError(path, f"{where}, and reading what is left did not finish in {timeout:.0f} s; "
                                 f"{OTHER_FORMAT}") from None
    if r.returncode != 0 or not r.stdout.strip():
        why = (r.stderr.strip().splitlines() or [f"the HDF5 library crashed (exit {r.returncode})"])[-1]
        raise RunFileError(path, f"{where}, and HDF5 cannot read what is left ({why}): the cut took metadata "
                                 f"(group or chunk indexes) that every row depends on, since HDF5 keeps one index "
                                 f"for the whole file; {OTHER_FORMAT}")
    found = json.loads(r.stdout.strip().splitlines()[-1])
    if found["hooks"] and not any(found["hooks"].values()):
        why = "; ".join(f"{h}: {e}" for h, e in list(found["lost"].items())[:2]) or "every row lies past the cut"
        raise RunFileError(path, f"{where}, and no row survives ({why}): HDF5 keeps the index of every hook's "
                                 f"rows inside the one file, and the cut took it; {OTHER_FORMAT}")
    return found


def _main(path: str) -> None:
    try:
        print(json.dumps(probe(path)))
    except Exception as e:
        print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _main(sys.argv[1])
