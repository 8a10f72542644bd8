"""A periodic progress line for long captures: frames, rows, MB/s, ring fill, drops."""
from __future__ import annotations

import sys
import threading


class Progress:
    def __init__(self, session, every_s: float = 1.0, stream=None):
        self.session = session
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._thread = threading.Thread(target=self._loop, name="dmi-progress", daemon=True)
        self._thread.start()

    def line(self) -> str:
        s = self.session.stats()
        rows = s["rows"]
        return (f"dmi: step {s['steps']}  frames {s['frames']}  rows {rows['written']}/{rows['produced']} written  "
                f"{s['bytes_written'] / 1e6:.1f} MB at {s['sink_mb_s']:.1f} MB/s (drain {s['drain_mb_s']:.1f})  "
                f"ring {100 * s['ring']['fill']:.0f}% (peak {100 * s['ring']['high_water_bytes'] / s['ring']['bytes']:.0f}%)  "
                f"dropped {rows['dropped']}")

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._emit(self.line())

    def _emit(self, text: str, final: bool = False) -> None:
        if self._tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._emit(self.line(), final=True)
