"""Progress lines of xdist workers, shown by the controller's terminal reporter.

A worker has no terminal of its own (what it prints lands in the middle of the controller's
progress dots), so it appends its lines to a file the controller named; the controller prints
what is new before each report it shows, in its main thread, and from a thread of its own only
when no report has come for a second (every worker waiting on a long build), so a slow base
is never silent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from typing import Any

__all__ = ["Relay", "append_line"]

_QUIET = 1.0  # seconds without a report before the relay's thread prints on its own


def append_line(path: str, line: str) -> None:
    """A worker's line, appended in one write (O_APPEND: lines of two workers never mix)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)


class Relay:
    """The controller's side: the file workers write to, and the printing of its new lines."""

    def __init__(self, terminal: Any) -> None:
        fd, self.path = tempfile.mkstemp(prefix="pytest-sandbox-progress-")
        os.close(fd)
        self._tr = terminal
        self._pos = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="sandbox-progress-relay")
        self._thread.start()

    def flush(self, *, main: bool = True) -> None:
        """Print the complete lines written since the last flush."""
        with self._lock:
            if main:
                self._last = time.monotonic()
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._pos)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1
            self._pos += end
            for line in data[:end].decode("utf-8", errors="replace").splitlines():
                self._tr.ensure_newline()
                self._tr.write_line(line)

    def _watch(self) -> None:
        while not self._stop.wait(_QUIET / 4):
            if time.monotonic() - self._last >= _QUIET:
                self.flush(main=False)

    def close(self) -> None:
        """Print what is left and remove the file. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.flush()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
