"""Closing a remote session whose engine died: the engine's own error is the one the caller
sees (a `with` block's exit must not raise a second copy of it); anything else still raises."""
from __future__ import annotations

import pytest

from dmi.remote import RemoteAdapter, RemoteSession
from dmi.session import _ARMED


class EngineDeadError(RuntimeError):
    """Named as vLLM's: the engine process is gone."""


class _Adapter(RemoteAdapter):
    engine_name = "fake"


class _Session(RemoteSession):
    def __init__(self, error):
        super().__init__(object(), _Adapter(None), None)
        self.error = error

    def _engine_dead(self, error):
        return isinstance(error, EngineDeadError)

    def _rpc_close(self):
        raise self.error


def test_close_after_the_engine_died_reports_instead_of_raising(caplog):
    s = _Session(EngineDeadError("EngineCore encountered an issue"))
    with pytest.raises(ValueError, match="the step failed"):
        with s:
            raise ValueError("the step failed")   # what generate() raised; __exit__ adds nothing
    assert s.closed and id(s.engine) not in _ARMED
    assert "died before dmi closed its session" in s.stats()["errors"][0]
    assert any("died before dmi closed" in r.message for r in caplog.records)


def test_close_raises_any_other_rpc_error():
    s = _Session(OSError("the RPC socket broke"))
    with pytest.raises(OSError, match="socket"):
        s.close()
    assert id(s.engine) not in _ARMED
