"""A marker answered just as the sink thread ends is an answer: the session's stop must not
read it as a dead drain (which marks the run incomplete). Seen under heavy load at exit."""
from __future__ import annotations

import threading

import torch

import dmi
import dmi.session
from dmi.ring.frames import Marker


class _LateEvent(threading.Event):
    """The stop marker's event, whose waiter looks again only after the sink thread has set it
    and ended: the window a loaded machine opens between a timed-out wait and the next look."""

    sinker: threading.Thread

    def wait(self, timeout=None):
        if timeout is None:
            return super().wait()
        self.sinker.join(10.0)
        return False


def test_stop_answered_as_the_sink_thread_ends_counts_as_stopped(load, out, monkeypatch):
    model = load("qwen3")
    s = dmi.attach(model, dmi.CaptureSpec(hooks=["blocks.0.hook_resid_post"], sink=out))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))

    def marker(kind, done):
        if kind == "stop":
            done.__class__ = _LateEvent
            done.sinker = s.drain._sinker
        return Marker(kind, done)

    monkeypatch.setattr(dmi.session, "Marker", marker)
    s.close()
    assert not s.drain._sinker.is_alive()
    with dmi.open(out) as run:
        assert run.complete
