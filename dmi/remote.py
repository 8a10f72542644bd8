"""Sessions for engines whose model runs in other processes (vLLM workers, SGLang's scheduler).

Capture must happen next to the model: shipping every captured row back to the caller's
process would cost more than the capture. So each worker process runs an ordinary
`dmi.session.Session` (ring, drain, sink) around a worker-side adapter, and the caller's
process holds a `RemoteSession`: the same user-facing surface (stats, flush, close, a context
manager) steering those worker sessions through the engine's own RPC.

`dmi.attach(engine, spec)` returns `adapter.open_session(spec, progress)` when the adapter
plugin returns a `RemoteAdapter`.
"""
from __future__ import annotations

import logging
import threading

from dmi.adapter import Adapter

log = logging.getLogger("dmi")


class RemoteAdapter(Adapter):
    """Front-end adapter of a multi-process engine. It resolves and validates the spec in the
    caller's process (bad input fails here, before any worker is touched) and opens the worker
    sessions through the engine's RPC."""

    remote = True

    def open_session(self, spec, progress: bool = False) -> "RemoteSession":
        raise NotImplementedError

    def arm(self, session, bindings):  # workers arm themselves; see open_session
        raise TypeError(f"{type(self).__name__} captures in the engine's worker processes: use open_session")

    def disarm(self):
        pass


class RemoteSession:
    """Caller-side handle of the sessions running in an engine's workers.

    Subclasses implement the three RPCs; each returns one value per worker (rank)."""

    def __init__(self, engine, adapter: RemoteAdapter, spec):
        from dmi.errors import SessionStateError
        from dmi.session import _ARMED

        self.engine = engine
        self.adapter = adapter
        self.spec = spec
        self.closed = False
        self._lock = threading.Lock()
        self._final: list[dict] | None = None
        if id(engine) in _ARMED:
            raise SessionStateError("this engine already has an open dmi session; leave it (session.close()) first")
        _ARMED[id(engine)] = self

    # -- implemented per engine ---------------------------------------------------------
    def _rpc_stats(self) -> list[dict]:
        raise NotImplementedError

    def _rpc_flush(self, timeout: float | None) -> None:
        raise NotImplementedError

    def _rpc_close(self) -> list[dict]:
        """Detach in every worker: flush, disarm, close the sink; return each worker's final stats."""
        raise NotImplementedError

    # -- user-facing, as dmi.session.Session ---------------------------------------------
    def stats(self) -> dict:
        """The worker's accounting (one worker), or {"ranks": [...]} with one entry per rank."""
        per_rank = self._final if self._final is not None else self._rpc_stats()
        return per_rank[0] if len(per_rank) == 1 else {"ranks": per_rank}

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything the workers captured so far is written and readable."""
        if not self.closed:
            self._rpc_flush(timeout)

    def close(self) -> None:
        from dmi.session import _ARMED

        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            self._final = self._rpc_close()
        except Exception as e:
            if not self._engine_dead(e):
                raise
            # Nothing is left to close: each worker closed its session as it stopped, marking
            # its file incomplete with the engine's error. Raising again here would bury the
            # engine's own error (a `with` block's exit) under a second copy of it.
            msg = (f"the {self.adapter.engine_name} engine died before dmi closed its session "
                   f"({type(e).__name__}); each worker wrote its file out as it stopped, marked incomplete")
            log.warning("dmi: %s", msg)
            self._final = [{"errors": [msg]}]
        finally:
            _ARMED.pop(id(self.engine), None)

    def _engine_dead(self, error: BaseException) -> bool:
        """Whether `error` from an RPC means the engine is gone (per engine)."""
        return False

    detach = close

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dmi.RemoteSession {self.adapter.engine_name} closed={self.closed}>"
