"""Pausing every process of a sandbox while its files are copied (``snapshot()``, ``fork()``).

The sandbox's processes are exactly those of its pid namespace. Each gets SIGSTOP (from the
host, so neither the sandbox's init nor its processes can refuse it) until a pass over /proc
finds none left running, and SIGCONT afterwards. Stopped processes cannot write, rename or swap
a path while the writable layer is being copied, so the copy sees one consistent tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from .._lifeline import pids, read_stat
from .cgroups import Cgroup

__all__ = ["paused"]

_PASSES = 100


def _members(ns: str) -> list[int]:
    found = []
    for pid in pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                found.append(pid)
    return found


def _stat(pid: int) -> tuple[str, int]:
    """State letter and parent pid ('X' once gone)."""
    return read_stat(pid) or ("X", 0)


@contextlib.contextmanager
def paused(init_pid: int, cgroup: Cgroup | None = None, settle: float = 2.0) -> Iterator[int]:
    """Stop every process in the pid namespace of ``init_pid`` (a host pid) for the block.

    With the sandbox's ``cgroup`` its freezer does it (the kernel stops every member at once,
    forks included; yields -1); otherwise, or where it cannot freeze:

    Yields how many processes were stopped. Processes forked while a pass runs are caught by
    the next pass; the block starts once a pass finds nothing new and every stopped process has
    reached the stopped state (or ``settle`` seconds have passed, for one stuck in the kernel).
    """
    if cgroup is not None:
        with cgroup.frozen() as frozen:
            if frozen:
                yield -1
                return
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        yield 0
        return
    # pidfds, so that a pid reused meanwhile by an unrelated process is never signalled.
    stopped: dict[int, int] = {}
    try:
        for _ in range(_PASSES):
            new = [p for p in _members(ns) if p not in stopped]
            if not new:
                break
            for pid in new:
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") != ns:
                        raise ProcessLookupError(pid)
                    signal.pidfd_send_signal(fd, signal.SIGSTOP)
                except OSError:
                    os.close(fd)
                    continue
                stopped[pid] = fd
        start = time.monotonic()
        waiting = set(stopped)
        while waiting and time.monotonic() < start + settle:
            stats = {p: _stat(p) for p in stopped}
            halted = {p for p, (state, _) in stats.items() if state in ("T", "t", "X", "Z")}
            # A vfork parent whose child we stopped before its exec waits in the kernel ('D') and
            # never reaches the stopped state, but cannot run either: it counts as paused.
            vfork_parents = {stats[p][1] for p in halted}
            waiting = {p for p in waiting if p not in halted and not (stats[p][0] == "D" and p in vfork_parents)}
            if waiting:
                time.sleep(0.0005)
        yield len(stopped)
    finally:
        for fd in stopped.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGCONT)
            os.close(fd)
