"""A served request's rows, read back from the run file by its uid.

One uid holds the rows of each engine request it became (names.py): per (prompt, choice),
per hook, the rows by position and the rows the file records as missing, with why. Choices
of one prompt share its prompt: where the engine served a choice's prompt positions from
its prefix cache (a gap "prefix_cache"), the rows come from a sibling of the same request
that computed them (the same tokens at the same positions); other requests' rows are never
used, so no tenant's result holds another's.

Encodings (docs/serving.md):
- inline: per hook {"dtype", "shape", "positions", "data"}: data is base64 of the rows' raw
  little-endian bytes in C order (bfloat16 as its 16-bit patterns);
- safetensors: tensors "<hook>" [rows, ...] and "<hook>.positions" int64 [rows];
- npy: one hook's rows (bfloat16 widened to float32, which holds it exactly).
"""
from __future__ import annotations

import base64
import contextlib
import json
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .names import PREFIX, parse_row_name

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


_FLUSH_LOCK = threading.Lock()
_LAST_SEQ = [0]
# One reader of the live run file at a time in this process. HDF5 shares one open file (its
# metadata cache and end of file) among every handle of a process: while another thread held
# a handle, a read that hit the engine's latest commit reopened into the same stale state and
# failed on every retry ("bad heap index", "len not positive after adjustment for EOA"; CI,
# two tenants' responses read back at once). Alone, a reopen sees the file as it is now.
_READ_LOCK = threading.Lock()


@contextlib.contextmanager
def open_run(run_path: str):
    """The live run file, opened for this thread alone (see _READ_LOCK)."""
    import dmi

    with _READ_LOCK, dmi.open(run_path) as run:
        yield run


def flush(run_path: str, timeout: float) -> bool:
    """Ask the engine to commit everything it captured so far; True once every
    tensor-parallel rank has (a rank's rows complete the others': split heads, partial sums)."""
    from .engine import ack_path, read_marker, write_marker

    req = f"{run_path}.dmi-flush"
    # Responses flush from several threads at once: one at a time, so the numbers the file
    # holds only grow (a smaller one written last would leave a larger one's wait unanswered)
    # and no two share a temporary file.
    with _FLUSH_LOCK:
        seq = _LAST_SEQ[0] = max(time.time_ns(), _LAST_SEQ[0] + 1)
        write_marker(req, seq)
    # Rank 0's acknowledgement names the tensor-parallel size; the other ranks' are then waited for.
    deadline = time.monotonic() + timeout
    waiting = None
    while True:
        if waiting is None:
            done, tp_size = read_marker(ack_path(run_path, 0))
            if done >= seq:
                waiting = [ack_path(run_path, r) for r in range(1, tp_size)]
        if waiting is not None:
            waiting = [a for a in waiting if read_marker(a)[0] < seq]
            if not waiting:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@dataclass
class HookRows:
    rows: torch.Tensor
    positions: np.ndarray
    dropped: list[dict] = field(default_factory=list)   # [{"positions": [...], "reason": ...}]
    shared: list[int] = field(default_factory=list)     # positions taken from a sibling (shared prompt)


@dataclass
class Part:
    """One engine request of a served request: (prompt, choice)."""

    name: str
    prompt: int
    choice: int | str
    hooks: dict[str, HookRows]

    @property
    def complete(self) -> bool:
        return not any(h.dropped for h in self.hooks.values())

    def describe(self) -> dict:
        return {"name": self.name, "prompt": self.prompt, "choice": self.choice, "complete": self.complete,
                "hooks": {k: {"rows": int(len(h.positions)), "positions": _ranges(h.positions),
                              "dropped": h.dropped, "shared_prompt_positions": _ranges(np.asarray(h.shared))}
                          for k, h in self.hooks.items()}}


def read(run_path: str, uid: str, hooks: list[str]) -> list[Part]:
    """Every (prompt, choice) of request `uid`, with `hooks`' rows (sorted by position)."""
    with open_run(run_path) as run:
        mine = [n for n in run.requests if n.startswith(uid + ".")]
        have = set(run.hooks)
        parts: list[Part] = []
        for name in mine:
            parsed = parse_row_name(name)
            if parsed is None or parsed[0] != uid:
                continue
            gaps = run.gaps(request=name)
            out = {}
            for hook in hooks:
                if hook in have:
                    rows, pos = run.get(hook, name), run.positions(hook, name).numpy()
                else:
                    rows, pos = torch.empty(0), np.zeros(0, np.int64)
                out[hook] = HookRows(rows, pos, _group([g for g in gaps if g["hook"] == hook]))
            parts.append(Part(name, parsed[1], parsed[2], out))
    _share_prompts(parts)
    parts.sort(key=lambda p: (p.prompt, p.choice == PREFIX, p.choice if isinstance(p.choice, int) else 0))
    return parts


def _group(gaps: list[dict]) -> list[dict]:
    by: dict[str, list[int]] = {}
    for g in gaps:
        by.setdefault(g["reason"], []).append(g["position"])
    return [{"reason": r, "positions": sorted(set(p))} for r, p in by.items()]


def _share_prompts(parts: list[Part]) -> None:
    """Fill a choice's prefix-cache gaps from siblings of the same prompt that computed them."""
    for p in parts:
        sibs = [q for q in parts if q is not p and q.prompt == p.prompt]
        for hook, h in p.hooks.items():
            cached = [d for d in h.dropped if d["reason"] == "prefix_cache"]
            if not cached or not sibs:
                continue
            want = np.array(sorted({x for d in cached for x in d["positions"]}), dtype=np.int64)
            got_rows, got_pos = [], []
            for q in sibs:
                qh = q.hooks.get(hook)
                if qh is None or not len(qh.positions):
                    continue
                sel = np.isin(qh.positions, want) & ~np.isin(qh.positions, np.asarray(got_pos, np.int64))
                if sel.any():
                    got_rows.append(qh.rows[torch.from_numpy(np.flatnonzero(sel))])
                    got_pos.extend(qh.positions[sel].tolist())
            if not got_pos:
                continue
            rows = torch.cat([h.rows.reshape(len(h.positions), *got_rows[0].shape[1:])] + got_rows)
            pos = np.concatenate([h.positions, np.asarray(got_pos, np.int64)])
            order = np.argsort(pos, kind="stable")
            h.rows, h.positions = rows[torch.from_numpy(order)], pos[order]
            h.shared = sorted(got_pos)
            left = sorted(set(want.tolist()) - set(got_pos))
            h.dropped = [d for d in h.dropped if d["reason"] != "prefix_cache"]
            if left:
                h.dropped.append({"reason": "prefix_cache", "positions": left})


def _ranges(pos: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...] of sorted positions: a compact manifest."""
    pos = np.asarray(pos, dtype=np.int64)
    if not len(pos):
        return []
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    return [[int(a[0]), int(a[-1]) + 1] for a in np.split(pos, breaks)]


# -- encodings --------------------------------------------------------------------------------

def _raw(t: torch.Tensor) -> tuple[bytes, str]:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes(), "bfloat16"
    a = t.numpy()
    return a.astype(a.dtype.newbyteorder("<")).tobytes(), str(a.dtype)


def inline(parts: list[Part], hooks: list[str], positions) -> list[dict]:
    """The documented inline encoding of `hooks` at `positions` ("last", "all" or a list)."""
    out = []
    for p in parts:
        if p.choice == PREFIX:
            continue
        enc = {}
        for hook in hooks:
            h = p.hooks[hook]
            sel = np.arange(len(h.positions))
            if positions == "last":
                sel = sel[-1:]
            elif isinstance(positions, list):
                sel = np.flatnonzero(np.isin(h.positions, positions))
            rows = h.rows[torch.from_numpy(sel)] if len(sel) else h.rows[:0]
            data, dtype = _raw(rows)
            enc[hook] = {"dtype": dtype, "shape": list(rows.shape), "positions": h.positions[sel].tolist(),
                         "data": base64.b64encode(data).decode()}
        out.append({"prompt": p.prompt, "choice": p.choice, "complete": p.complete,
                    "dropped": {k: h.dropped for k, h in p.hooks.items() if h.dropped}, "hooks": enc})
    return out


def inline_bytes(parts: list[Part], hooks: list[str], positions) -> int:
    n = 0
    for p in parts:
        for hook in hooks:
            h = p.hooks[hook]
            k = len(h.positions) if positions == "all" else (min(1, len(h.positions)) if positions == "last"
                                                              else int(np.isin(h.positions, positions).sum()))
            n += k * (h.rows[0].numel() * h.rows.element_size() if len(h.rows) else 0)
    return n


def safetensors_stream(part: Part, chunk: int = 1 << 20):
    """A safetensors file of one (prompt, choice), as byte chunks (header first)."""
    tensors = []
    for hook, h in part.hooks.items():
        tensors.append((hook, h.rows.contiguous()))
        tensors.append((f"{hook}.positions", torch.from_numpy(np.ascontiguousarray(h.positions, np.int64))))
    header, offset = {}, 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"dmi": json.dumps(part.describe())}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    yield struct.pack("<Q", len(head)) + head
    for _, t in tensors:
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        for i in range(0, flat.numel(), chunk):
            yield flat[i:i + chunk].numpy().tobytes()


def npy_stream(rows: torch.Tensor, chunk: int = 1 << 20):
    """One hook's rows as a .npy file, as byte chunks."""
    import io

    if rows.dtype == torch.bfloat16:
        rows = rows.float()
    a = np.ascontiguousarray(rows.numpy())
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(a))
    yield buf.getvalue()
    raw = a.reshape(-1).view(np.uint8)
    for i in range(0, raw.size, chunk):
        yield raw[i:i + chunk].tobytes()
