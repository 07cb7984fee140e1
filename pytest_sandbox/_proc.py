"""Running one host-side command (nsenter, mmdebstrap, tar) with bounded output and a timeout.

Output is read from pipes while the command runs and kept up to ``max_output`` bytes per stream:
the first half and the last half, with a marker saying how much was left out between them, so
a command printing gigabytes costs the runner a bounded amount of memory. The command is done
when its process exits, not when its pipes close: a background process it leaves behind keeps
its inherited stdout, which a single sink thread drains (and, past a bound, closes) without
anyone waiting for it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ._lifeline import kill_tree
from .types import DEFAULT_MAX_OUTPUT

__all__ = ["CLIP_SH", "DEFAULT_MAX_OUTPUT", "TRUNCATED", "Cancel", "Completed", "clip", "memfd", "run"]

TRUNCATED = "bytes truncated by pytest-sandbox (max_output) ..."
"""What the marker left where output was cut says, after the number of bytes left out."""
CLIP_SH = (
    'clip() { s=$(wc -c <"$1"); if [ "$s" -gt "$2" ]; then h=$(($2 / 2 - 64)); head -c "$h" "$1"; '
    f"printf '\\n[... %s {TRUNCATED}]\\n' $((s - 2 * h)); "
    'tail -c "$h" "$1"; else cat "$1"; fi; }'
)
"""Shell function ``clip FILE LIMIT`` for the remote backends: the same cut, made where the output
is, so that at most ``LIMIT`` bytes of a stream travel to the runner."""
_ORPHAN_LIMIT = 64 << 20  # what the sink drains from a background writer before closing on it
# Pipes the sink holds at most: a sandbox process that keeps every exec's output pipe open (it
# can collect them over a Unix socket) would otherwise cost the runner two fds per exec, until
# it runs out. Past this the oldest are closed: their writers get EPIPE, nothing else changes.
_MAX_ORPHANS = 256
_CHUNK = 1 << 16


_TELL_PID_WITHIN = 2.0  # seconds a helper has to tell a command's pid once the command is to be killed


class Child(Protocol):
    """A process a :class:`Spawner` started: its pid (None until its helper has told it, and for
    a command that could not start) and an fd that becomes readable when there is news of it."""

    @property
    def pid(self) -> int | None: ...
    @property
    def exit_fd(self) -> int: ...

    def ready(self) -> bool: ...
    def told(self, within: float) -> bool: ...
    def abandon(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Start:
    """What a :class:`Spawner` is asked to start: ``argv`` with exactly ``env``, on the fds
    ``stdio`` (stdin, stdout, stderr); ``extra`` is ``(fd, i)``: the command inherits ``fd`` too,
    as its fd 3, and ``argv[i]`` becomes ``"3"``; ``cwd``, for commands started inside a sandbox."""

    argv: list[str]
    env: dict[str, str]
    stdio: tuple[int, int, int]
    extra: tuple[int, int] | None = None
    cwd: str | None = None


class Spawner(Protocol):
    """Starts processes on our behalf (the local engine's filtered spawner)."""

    def spawn(self, start: Start) -> Child: ...


class Cancel:
    """A request, from any thread, to stop a running command the way a timeout does: its whole
    process tree killed. The async API sets it when the task awaiting an exec is cancelled.

    Pollable (an eventfd) for the loops that wait on file descriptors; :meth:`link` sets
    ``threading.Event`` s too, for the ones that wait on those."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._set = False
        self._linked: list[threading.Event] = []

    def fileno(self) -> int:
        return self._fd

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Ask for the stop. Idempotent."""
        with self._lock:
            if self._set:
                return
            self._set = True
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)
            linked = list(self._linked)
        for event in linked:
            event.set()

    def link(self, event: threading.Event) -> None:
        """Set ``event`` when this is set (at once if it already is)."""
        with self._lock:
            self._linked.append(event)
            if not self._set:
                return
        event.set()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool
    truncated: bool = False


def _die_with_parent() -> None:
    # SIGKILL when the thread that started us exits; run() waits in that thread, so this fires
    # only when our process dies (e.g. kill -9), never while we still want the child.
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Capture:
    """One stream's output: its first and last bytes (with the marker, at most ``limit``), and how many were dropped."""

    def __init__(self, limit: int, on_line: Callable[[str], None] | None) -> None:
        self.half = max(limit // 2 - 64, 1)  # room for the marker: head, marker and tail fit in limit
        self.head = bytearray()
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_len = 0
        self.dropped = 0
        self.on_line = on_line
        self.partial = b""
        self.truncated = False

    def add(self, data: bytes) -> None:
        if self.on_line is not None:
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()[-_CHUNK:]
            for line in lines:
                self.on_line(line.decode("utf-8", errors="replace").rstrip("\r"))
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(data)
        self.tail_len += len(data)
        while self.tail_len - len(self.tail[0]) >= self.half:
            self.tail_len -= len(self.tail[0])
            self.dropped += len(self.tail.popleft())

    def finish(self) -> bytes:
        if self.on_line is not None and self.partial:
            self.on_line(self.partial.decode("utf-8", errors="replace"))
        tail = b"".join(self.tail)
        cut = max(0, len(tail) - self.half)
        dropped = self.dropped + cut
        self.truncated = dropped > 0
        if not dropped:
            return bytes(self.head) + tail
        marker = f"\n[... {dropped} {TRUNCATED}]\n".encode()
        return bytes(self.head) + marker + tail[cut:]


class _Sink:
    """Drains pipes whose command has finished while background processes still hold them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._dropped: list[int] = []  # taken out of _fds, for the loop to unregister and close
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None

    def adopt(self, fd: int) -> None:
        with self._lock:
            self._fds[fd] = 0
            while len(self._fds) > _MAX_ORPHANS:
                oldest = next(iter(self._fds))
                del self._fds[oldest]
                self._dropped.append(oldest)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="sandbox-output-sink")
                self._thread.start()
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: set[int] = set()
        while True:
            with self._lock:
                for fd in self._dropped:
                    if fd in registered:
                        poller.unregister(fd)
                        registered.discard(fd)
                    os.close(fd)
                self._dropped.clear()
                for fd in set(self._fds) - registered:
                    poller.register(fd, select.POLLIN)
                    registered.add(fd)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                try:
                    n = len(os.read(fd, _CHUNK))
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                with self._lock:
                    if fd not in self._fds:  # dropped meanwhile: closed at the top of the loop
                        continue
                    self._fds[fd] += n
                    done = n == 0 or self._fds[fd] > _ORPHAN_LIMIT
                    if done:
                        del self._fds[fd]
                if done:
                    poller.unregister(fd)
                    registered.discard(fd)
                    os.close(fd)


_sink = _Sink()


def clip(data: bytes, limit: int) -> tuple[bytes, bool]:
    """``data`` cut to ``limit`` bytes the way a captured stream is (head, marker, tail)."""
    if len(data) <= limit:
        return data, False
    cap = _Capture(limit, None)
    cap.add(data)
    return cap.finish(), True


def memfd(name: str, data: bytes = b"") -> int:
    """A close-on-exec memory file holding ``data``, at its start (for a child to read)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _drain(fd: int, cap: _Capture) -> bool:
    """Read what is there now; False once the pipe is at EOF."""
    while True:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return True
        if not data:
            return False
        cap.add(data)


def _kill(proc: Child | subprocess.Popen[bytes]) -> None:
    """Kill a command's whole tree. A command whose pid its helper has not told yet (it was
    started a moment ago) is waited for a little; one that does not start (sandbox code can stop
    a process before its exec) is given up on: its helper kills it once it has started."""
    if not isinstance(proc, subprocess.Popen) and proc.pid is None:
        proc.told(within=_TELL_PID_WITHIN)
    pid = proc.pid  # once: a helper's told pid is checked at each read, and may be gone by the next
    if pid is None:
        assert not isinstance(proc, subprocess.Popen)
        proc.abandon()
    else:
        kill_tree(pid)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    die_with_parent: bool = False,
    max_output: int = DEFAULT_MAX_OUTPUT,
    spawner: Spawner | None = None,
    cancel: Cancel | None = None,
    fd_data: tuple[bytes, int] | None = None,
    cwd: str | None = None,
) -> Completed:
    """Run ``argv`` in a new session; on timeout, or when ``cancel`` is set, kill its whole tree.
    Never raises for exit codes.

    With ``spawner`` the command is started by that helper (under its seccomp filter).
    ``fd_data`` is ``(data, i)`` (with a spawner): the command inherits a file holding ``data`` (a
    memfd; not its argv, which every host user can read in /proc) as fd 3, and ``argv[i]`` becomes
    ``"3"``. ``cwd`` (with a spawner that starts commands inside a sandbox): where it starts.
    """
    pipes = [os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)]
    caps = [_Capture(max_output, on_line), _Capture(max_output, on_line)]
    stdin: int = memfd("stdin", input) if input else subprocess.DEVNULL
    if fd_data is not None and spawner is None:
        raise ValueError("fd_data needs a spawner: only it places the file at a known fd (3)")
    extra = None if fd_data is None else (memfd("data", fd_data[0]), fd_data[1])
    start = time.perf_counter()
    open_fds = [r for r, _ in pipes]
    pidfd = -1
    proc: Child | subprocess.Popen[bytes] | None = None
    try:
        try:
            if spawner is not None:
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if stdin == subprocess.DEVNULL else -1
                try:
                    stdio = (stdin if null < 0 else null, pipes[0][1], pipes[1][1])
                    env = dict(os.environ if env is None else env)
                    proc = spawner.spawn(Start(list(argv), env, stdio, extra, cwd))
                finally:
                    if null >= 0:
                        os.close(null)
            else:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=stdin,
                    stdout=pipes[0][1],
                    stderr=pipes[1][1],
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=_die_with_parent if die_with_parent else None,
                )
        finally:
            for _, w in pipes:
                os.close(w)
            if extra is not None:
                os.close(extra[0])
        for r in open_fds:
            os.set_blocking(r, False)
        pidfd = os.pidfd_open(proc.pid) if isinstance(proc, subprocess.Popen) else proc.exit_fd
        timed_out = False
        deadline = None if timeout is None else start + timeout
        poller = select.poll()
        for fd in (*open_fds, pidfd):
            poller.register(fd, select.POLLIN)
        if cancel is not None:
            poller.register(cancel.fileno(), select.POLLIN)
        live = dict(zip(open_fds, caps, strict=True))
        exited = killed = False
        while not exited:
            wait_ms = None
            if deadline is not None:
                wait_ms = max(0, int((deadline - time.perf_counter()) * 1000) + 1)
            events = poller.poll(wait_ms)
            for fd, _ in events:
                if exited:
                    break
                if fd == pidfd:
                    exited = proc.ready() if not isinstance(proc, subprocess.Popen) else True
                elif cancel is not None and fd == cancel.fileno():
                    poller.unregister(fd)
                    _kill(proc)
                    exited = killed = True
                elif fd in live and not _drain(fd, live[fd]):
                    poller.unregister(fd)
                    os.close(fd)
                    open_fds.remove(fd)
                    del live[fd]
            if not exited and deadline is not None and time.perf_counter() >= deadline:
                _kill(proc)
                timed_out = True
                exited = killed = True
        if killed and not isinstance(proc, subprocess.Popen):
            # Its tree is dead: its helper tells at once, or is in no state to (then as killed).
            proc.wait(timeout=_TELL_PID_WITHIN)
        proc.wait()
        duration = time.perf_counter() - start
        for fd in list(open_fds):
            if not _drain(fd, live[fd]):
                os.close(fd)
                open_fds.remove(fd)
        for fd in open_fds:  # still held by something the command left running
            _sink.adopt(fd)
        open_fds = []
        code = proc.wait()
        if code < 0:
            code = 128 - code  # the shell's convention for "killed by signal N"
        out, err = caps[0].finish(), caps[1].finish()
        return Completed(code, out, err, duration, timed_out, caps[0].truncated or caps[1].truncated)
    finally:
        for fd in open_fds:
            os.close(fd)
        if proc is not None and not isinstance(proc, subprocess.Popen):
            proc.close()
        elif pidfd >= 0:
            os.close(pidfd)
        if stdin != subprocess.DEVNULL:
            os.close(stdin)
