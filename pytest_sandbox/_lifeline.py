"""Processes that live exactly as long as we do, and what the rest of the package reads of /proc.

A *lifeline* is the write end of a pipe only this process holds: the helper at its other end sees
EOF when we exit, cleanly or by ``kill -9``, and acts on it. The engine's user-namespace holder,
the Daytona backend's watchdog, the CLI's ``serve --until-stdin-closes`` and the holder process
inside every local sandbox (a shell, there) all follow it.

Core module: imports nothing of the package but the programs it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from .programs import source

__all__ = [
    "Channel",
    "Helper",
    "Reaper",
    "Watchdog",
    "end_processes_using",
    "interpreter",
    "is_zombie",
    "kill_tree",
    "pids",
    "read_stat",
    "on_eof",
]


class Helper:
    """A small Python process that runs ``lines``, then waits for EOF on its stdin (our lifeline),
    then runs ``then``. ``stdout`` is a pipe when ``reply`` is set, for a start-up handshake."""

    def __init__(self, lines: Sequence[str], *, then: str = "", args: Sequence[str] = (), reply: bool = False) -> None:
        script = "\n".join([*lines, "import sys as _s; _s.stdin.buffer.read()", then])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if reply else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_reply(self, n: int = 200) -> bytes:
        """What the helper wrote first to its stdout (its handshake), or b"" if it died."""
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), n)

    def release(self) -> None:
        """Close the lifeline: the helper runs ``then`` now. Waits for it to exit."""
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.wait()

    def close(self) -> None:
        """Close the lifeline and kill the helper (for helpers whose ``then`` is nothing)."""
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait()


def interpreter() -> str:
    """The Python installation under the running one (a virtualenv's base), resolved."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


class Channel:
    """A helper that serves requests: ``script`` reads each request from the Unix socket whose
    fd is ``sys.argv[1]`` and answers it (optionally with fds). The socket is its lifeline: it
    sees EOF when we close it or die, and exits. ``launcher`` is the command line it starts
    through (e.g. ``nsenter`` into a namespace). One request at a time, from any thread.

    Scripts use the standard library only: through a launcher they run on the base interpreter,
    not a virtualenv's, whose path may not exist in the namespace entered (as root, the engine's
    mount namespace has the store over /tmp, where CI virtualenvs often live)."""

    def __init__(self, script: str, launcher: Sequence[str] = ()) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        python = interpreter() if launcher else sys.executable
        try:
            self.proc = subprocess.Popen(
                [*launcher, python, "-c", script, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._sock = ours

    def call(self, request: bytes, max_fds: int = 0) -> tuple[bytes, list[int]]:
        """Send ``request``; the answer and the fds that came with it. OSError if it is gone."""
        with self._lock:
            self._sock.send(request)
            if max_fds:
                msg, fds, _flags, _addr = socket.recv_fds(self._sock, 4096, max_fds)
                return msg, fds
            return self._sock.recv(4096), []

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)


class Watchdog:
    """A helper that runs ``script`` once this process is gone (clean exit or ``kill -9``), started
    on first need by :meth:`ensure`."""

    def __init__(self, script: str, *args: str) -> None:
        self._script = script
        self._args = args
        self._lock = threading.Lock()
        self._helper: Helper | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self._helper is None else self._helper.proc

    @property
    def pid(self) -> int | None:
        return None if self._helper is None else self._helper.pid

    def ensure(self) -> None:
        """Start the watchdog unless it runs."""
        with self._lock:
            if self._helper is None or self._helper.proc.poll() is not None:
                self._helper = Helper((), then=self._script, args=self._args)

    def fire(self) -> None:
        """Let it run its script now (we are closing) and wait for it."""
        if self._helper is not None:
            self._helper.release()


class Reaper:
    """A helper that SIGKILLs the processes it is told of once this process is gone (clean exit or
    ``kill -9``). For a local sandbox's init: the holder inside is its usual lifeline, but sandbox
    code can stop the holder, and nothing inside the sandbox can stop this."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._helper: Helper | None = None

    def watch(self, pid: int) -> None:
        """Kill ``pid`` when we are gone (if it is still the same process then)."""
        start = start_time(pid)
        if start is None:
            return
        with self._lock:
            for _ in range(2):
                if self._helper is None or self._helper.proc.poll() is not None:
                    self._helper = Helper([source("reap")])
                assert self._helper.proc.stdin is not None
                try:
                    self._helper.proc.stdin.write(f"{pid} {start}\n".encode())
                    self._helper.proc.stdin.flush()
                    return
                except OSError:  # it died: a new one (the old list is lost with it)
                    self._helper = None

    def close(self) -> None:
        """Stop the helper without killing anything (everything watched was closed)."""
        with self._lock:
            if self._helper is not None:
                self._helper.close()
                self._helper = None


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/PID/stat, clock ticks after boot), or None."""
    fields = _stat_fields(pid)
    return None if fields is None or len(fields) < 20 else fields[19].decode()


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` from the third (the state) on, or None when it is gone.
    The command name may hold spaces and parentheses, so they are counted from the last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return None


def on_eof(stream: int, then: Callable[[], None]) -> threading.Thread:
    """Call ``then`` (in a daemon thread) once ``stream`` reaches EOF: the other side of a parent's
    lifeline, e.g. ``serve --until-stdin-closes`` stopping when its parent dies."""

    def wait() -> None:
        with contextlib.suppress(OSError):
            while os.read(stream, 1 << 16):
                pass
        then()

    thread = threading.Thread(target=wait, daemon=True, name="lifeline")
    thread.start()
    return thread


# -- /proc ---------------------------------------------------------------------------------------
def pids() -> Iterator[int]:
    """Every process id this pid namespace shows."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid`` from ``/proc/PID/stat``, or None when it is gone."""
    fields = _stat_fields(pid)
    try:
        return None if fields is None else (fields[0].decode(), int(fields[1]))
    except (ValueError, IndexError):
        return None


def is_zombie(pid: int) -> bool:
    """True when ``pid`` is gone or has exited and waits to be reaped."""
    st = read_stat(pid)
    return st is None or st[0] == "Z"


_HELD = frozenset("TtZX")  # stopped, traced, or exited: a process in these states forks no more


def _held(pid: int, state: str) -> bool:
    """True when ``pid`` (sent SIGSTOP) can fork no more: stopped or exited, or a parent waiting
    in vfork() for a child that is stopped (shown as ``D`` in ``kernel_clone``: it stops only once
    that child execs, and dash starts every command with vfork, so such a wait is common)."""
    if state in _HELD:
        return True
    if state != "D":
        return False
    try:
        with open(f"/proc/{pid}/wchan", "rb") as f:
            return f.read().strip() == b"kernel_clone"
    except OSError:
        return False


def kill_tree(pid: int, budget: float = 10.0) -> None:
    """SIGKILL a process and every descendant, even ones that changed group or session.

    The tree is stopped first, until two scans in a row find nobody new and every process found
    is seen stopped: a stopped process cannot fork, its children stay its descendants (a killed
    parent's would be reparented out of reach), and one that was in the middle of a fork when
    the signal came has its child in the next scan. So a command that forks as fast as it can
    is caught whole, and is dead (a zombie at most) when this returns. ``budget`` seconds bound
    the stopping; the kill comes at the end anyway."""
    if pid <= 1:  # 0 and -1 name groups and everyone to kill(), 1 is init
        return
    stopped: set[int] = set()
    quiet = False
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        state: dict[int, str] = {}
        children: dict[int, list[int]] = {}
        for p in pids():
            st = read_stat(p)
            if st is not None:
                state[p] = st[0]
                children.setdefault(st[1], []).append(p)
        tree, frontier = {pid}, [pid]
        while frontier:
            kids = [k for k in children.get(frontier.pop(), ()) if k not in tree]
            tree.update(kids)
            frontier.extend(kids)
        tree &= state.keys()
        found = tree - stopped
        if not found and all(_held(p, state[p]) for p in tree):
            # Confirmed by a second scan: this one listed the pids before it read their states, so
            # a parent seen stopped may have forked after the listing, and its child is in the next.
            if quiet:
                break
            quiet = True
            continue
        quiet = False
        for p in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGSTOP)
        stopped |= found
    for p in [*(stopped - {pid}), pid]:  # the root last, as the in-sandbox version does
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    # Dead when this returns: a killed process lingers a moment before it exits, and on a loaded
    # machine a thousand of them take seconds (CI once saw one left after a 2 s wait), so the wait
    # has its own minute rather than what the stopping left of its budget.
    left = stopped | {pid}
    dead_by = time.monotonic() + 60.0
    while left and time.monotonic() < dead_by:
        left = {p for p in left if not is_zombie(p)}
        if left:
            time.sleep(0.001)


def end_processes_using(dirs: list[str], timeout: float = 5.0) -> None:
    """SIGKILL processes that still use one of ``dirs`` and wait until they are gone: those whose
    command line names it (a sandbox's bwrap), and those whose mount namespace has an overlay on
    it (everything running inside that sandbox)."""
    if not dirs:
        return
    # A trailing slash or space ends each name, so /r/abc never matches /r/abcd.
    needles = [f"{d}{end}".encode() for d in dirs for end in ("/", " ", "\0")]
    found = []
    me = os.getpid()
    for pid in pids():
        if pid == me:
            continue
        for what in ("cmdline", "mountinfo"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    text = f.read()
            except OSError:
                continue
            if any(n in text for n in needles):
                found.append(pid)
                break
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + timeout
    while found and time.monotonic() < end:
        found = [p for p in found if not is_zombie(p)]
        if found:
            time.sleep(0.01)
