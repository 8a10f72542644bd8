"""Engine side of serving: what each request asked for, applied in the step's plan.

The front end (dmi/serve/asgi.py) sends every request's checked spec to the engine as JSON
under the key "dmi" of the engine's per-request parameters (vLLM `SamplingParams.extra_args`,
SGLang `custom_params`): {"uid", "tenant", "kind", "n", "prompts", "hooks", "tokens",
"interventions"}. `hooks` are canonical names within the armed spec (None: all of them),
`tokens` a TokenFilter (None: the armed spec's alone).

A request's `interventions` (checked by dmi/serve/steer.py) reach the session's banks
(dmi/interventions/banks.py), which look each step's rows up here; a steering request's slot
is released when the last of its names is forgotten.

`RequestTable.masks(group, table)` turns the step's requests into a bool [hooks, rows] mask
for the planner (Planner.enable_request_masks): a row is kept for a hook when the armed spec
keeps it (the planner's own filters) AND its request selected that hook and its tokens keep
the row. Steps whose requests all take the armed spec cost one dict lookup per request.

`ServeChannel` is a daemon thread next to the session, one per tensor-parallel rank:
- flush requests from the front end: it writes a sequence number to `<run>.dmi-flush`; each
  rank's thread sends a flush marker through its session's drain (the engine thread never
  waits) and writes the number to its own file's `.dmi-flushed` (`<run>.dmi-flushed`,
  `<run>.rank<r>.dmi-flushed`) once everything captured before is committed; the front end
  reads once every rank has answered (a rank's split or partial rows complete rank 0's);
- the front end's death: when the process that started the engine is gone, capture stops,
  the file is closed marked incomplete with that error, and this engine process is asked to
  terminate (an orphan has no one to answer; it must not keep writing).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from dmi.plan.rows import RowTable

log = logging.getLogger("dmi")

KEY = "dmi"
FRONT_PID = "DMI_FRONT_PID"


def decode(raw) -> dict | None:
    """The front end's per-request JSON, or None for a request without one."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        return raw
    try:
        info = json.loads(raw)
    except (TypeError, ValueError):
        log.error("dmi: a request's 'dmi' parameter is not JSON from dmi's front end: %r", str(raw)[:200])
        return None
    return info if isinstance(info, dict) else None


@dataclass
class Served:
    hooks: np.ndarray | None      # bool [n_hooks]; None: every armed hook
    tokens: object | None         # a TokenMask; None: the armed spec's filter alone
    token_key: str | None         # identity of `tokens`, to mask requests sharing a filter at once
    interventions: list | None = None
    tenant: str | None = None
    uid: str | None = None


class RequestTable:
    """Row name -> what that request asked for. Bounded: names of finished requests are
    forgotten by the adapter; a cap guards against an adapter that never hears of an end."""

    LIMIT = 1 << 16

    def __init__(self, names: list[str], banks=None):
        """banks: the session's dmi.interventions.banks.Banks when clients may steer; they look
        each row's request up here, and a request's slot is freed when its last name is."""
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.by_name: dict[str, Served] = {}
        self.banks = banks
        self._names_of: dict[str, int] = {}  # uid -> its names held here (steering requests only)
        if banks is not None:
            banks.lookup = self.by_name.get

    def add(self, name: str, info: dict | None) -> None:
        if info is None or name in self.by_name:
            return
        hooks = info.get("hooks")
        vec = None
        if hooks is not None:
            vec = np.zeros(len(self.names), dtype=bool)
            for h in hooks:
                i = self.index.get(h)
                if i is None:  # the front end checked against the armed spec; a mismatch is a bug, say so
                    log.error("dmi: request %s selects hook %r, which this engine does not capture", name, h)
                else:
                    vec[i] = True
        tokens = info.get("tokens")
        mask = key = None
        if tokens is not None:
            from dmi.policies.filters import TokenMask
            from dmi.spec import TokenFilter

            mask = TokenMask(TokenFilter.model_validate(tokens))
            key = json.dumps(tokens, sort_keys=True)
        if len(self.by_name) >= self.LIMIT:
            self.forget(next(iter(self.by_name)))
        s = self.by_name[name] = Served(vec, mask, key, info.get("interventions"), info.get("tenant"),
                                        str(info["uid"]) if info.get("uid") is not None else None)
        if s.interventions and s.uid:
            self._names_of[s.uid] = self._names_of.get(s.uid, 0) + 1

    def forget(self, name: str) -> None:
        s = self.by_name.pop(name, None)
        if s is not None and s.interventions and s.uid and s.uid in self._names_of:
            self._names_of[s.uid] -= 1
            if self._names_of[s.uid] <= 0:
                del self._names_of[s.uid]
                if self.banks is not None:
                    self.banks.release(s.uid)

    def masks(self, group: str, table: RowTable) -> np.ndarray | None:
        """bool [hooks, rows]: which rows each hook keeps by its requests' choices; None when
        every request of the step takes the armed spec."""
        served = [self.by_name.get(r) for r in table.request_ids]
        if not any(s is not None and (s.hooks is not None or s.tokens is not None) for s in served):
            return None
        n_hooks = len(self.names)
        per_req = np.ones((len(served) + 1, n_hooks), dtype=bool)
        per_req[-1] = False  # index -1: padding rows
        for r, s in enumerate(served):
            if s is not None and s.hooks is not None:
                per_req[r] = s.hooks
        out = per_req[table.request].T.copy()  # [hooks, rows]
        filters: dict[str, tuple[object, list[int]]] = {}
        for r, s in enumerate(served):
            if s is not None and s.tokens is not None:
                filters.setdefault(s.token_key, (s.tokens, []))[1].append(r)
        for tokens, reqs in filters.values():
            mine = np.isin(table.request, reqs)
            out[:, mine & ~tokens(table, mine)] = False
        return out


class ServeChannel:
    # A served engine answers a response's flush within a poll. An engine a script drives
    # (vllm.LLM, sglang.Engine) flushes through its RPC instead, so its thread wakes only to
    # watch the front end: in an in-process engine every wake-up takes the GIL from the engine.
    POLL_S = 0.02
    IDLE_POLL_S = 0.25

    def __init__(self, session, run_path: str | None, rank: int = 0, tp_size: int = 1, served: bool = False):
        self.session = session
        self.poll_s = self.POLL_S if served else self.IDLE_POLL_S
        self.tp_size = int(tp_size)
        self.req = f"{run_path}.dmi-flush" if run_path else None
        self.ack = ack_path(run_path, rank) if run_path else None
        self.front = _front_pid()
        self._stop = threading.Event()
        self._seen = read_marker(self.req)[0] if self.req else 0
        self.thread = threading.Thread(target=self._run, name="dmi-serve", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_check = 0.0
        while not self._stop.wait(self.poll_s):
            if self.session.closed:
                return
            if self.req is not None:
                want = read_marker(self.req)[0]
                if want > self._seen:
                    self._seen = want
                    self._flush(want)
            now = time.monotonic()
            if self.front and now - last_check > 0.25:
                last_check = now
                if not _alive(self.front):
                    self._orphaned()
                    return

    def _flush(self, seq: int) -> None:
        if self.session._wait_marker("flush", 60.0):
            # The tensor-parallel size tells the front end which other ranks to wait for
            # (files of an earlier run with more ranks may still lie beside this one).
            write_marker(self.ack, seq, self.tp_size)

    def _orphaned(self) -> None:
        s = self.session
        msg = (f"dmi: the front end (pid {self.front}) that started this engine is gone; capture stopped and "
               f"the run is closed incomplete")
        log.error(msg)
        s.acct.error(msg)
        with s._lock:
            if s.closed:
                return
            s.closed = True
        s._shutdown(complete=False)
        os.kill(os.getpid(), signal.SIGTERM)


def ack_path(run_path: str, rank: int) -> str:
    """Where tensor-parallel rank `rank` acknowledges flushes: beside the file it writes."""
    from dmi.tp import rank_path

    return f"{rank_path(run_path, rank)}.dmi-flushed"


def write_marker(path: str, seq: int, tp_size: int | None = None) -> None:
    """One file of the flush handshake, replaced whole (a reader never sees half of it):
    "<seq>" for a request, "<seq> <tp_size>" for a rank's acknowledgement."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(seq) if tp_size is None else f"{seq} {tp_size}")
    os.replace(tmp, path)


def read_marker(path: str) -> tuple[int, int]:
    """(seq, tp_size) of a handshake file; (0, 1) while it is missing or unreadable."""
    try:
        with open(path) as f:
            parts = f.read().split()
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 1
    except (OSError, ValueError, IndexError):
        return 0, 1


def run_path(sink) -> str | None:
    """The file a sink writes, if it is a file sink (the serve channel's files sit beside it)."""
    if isinstance(sink, str) and sink != "memory":
        return sink
    if isinstance(sink, dict) and isinstance(sink.get("path"), str):
        return sink["path"]
    return None


def _front_pid() -> int | None:
    try:
        pid = int(os.environ.get(FRONT_PID, "0"))
    except ValueError:
        return None
    return pid if pid and pid != os.getpid() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is gone too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def mark_front_end() -> None:
    """Called early in every process of an engine. A process that multiprocessing did not
    start (a server, a user's script) is a front end and names itself; the engine processes
    it spawns inherit the name. (Not setdefault: a test process that spawned the server must
    not be taken for the server.)"""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        os.environ[FRONT_PID] = str(os.getpid())
