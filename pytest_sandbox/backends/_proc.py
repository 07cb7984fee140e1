"""Running one host-side command (nsenter, mmdebstrap, tar) with captured output and a timeout.

Output goes to memfd files, not pipes: a background process a command leaves running keeps
writing to its inherited stdout without ever blocking us or dying of EPIPE once we are done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Completed", "kill_tree", "run"]


@dataclass
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool


def _children(pid: int) -> list[int]:
    """Descendants of ``pid`` (host pids), found through /proc."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
            parent_of[int(entry)] = int(data[data.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parent_of.items() if pp == cur]
        found.extend(kids)
        frontier.extend(kids)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant, even ones that changed group."""
    victims = _children(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in [pid, *victims]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _die_with_parent() -> None:
    # SIGKILL when the thread that started us exits; run() waits in that thread, so this fires
    # only when our process dies (e.g. kill -9), never while we still want the child.
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    die_with_parent: bool = False,
) -> Completed:
    """Run ``argv`` in a new session; on timeout kill its whole tree. Never raises for exit codes."""
    out, err = _memfd("stdout"), _memfd("stderr")
    stdin: int = _memfd("stdin", input) if input else subprocess.DEVNULL
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        timed_out = False
        deadline = None if timeout is None else start + timeout
        streamed = [0, 0]
        partial = ["", ""]

        def stream(final: bool = False) -> None:
            assert on_line is not None
            for i, fd in enumerate((out, err)):
                size = os.fstat(fd).st_size
                if size > streamed[i]:
                    chunk = os.pread(fd, size - streamed[i], streamed[i])
                    streamed[i] = size
                    text = partial[i] + chunk.decode("utf-8", errors="replace")
                    lines = text.split("\n")
                    partial[i] = lines.pop()
                    for line in lines:
                        on_line(line.rstrip("\r"))
                if final and partial[i]:
                    on_line(partial[i])
                    partial[i] = ""

        while True:
            wait = 0.2 if on_line else None
            if deadline is not None:
                left = deadline - time.perf_counter()
                wait = max(0.0, left) if wait is None else max(0.0, min(wait, left))
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                if on_line:
                    stream()
                if deadline is not None and time.perf_counter() >= deadline:
                    kill_tree(proc.pid)
                    proc.wait()
                    timed_out = True
                    break
        duration = time.perf_counter() - start
        if on_line:
            stream(final=True)
        code = proc.returncode
        if code < 0:
            code = 128 - code  # the shell's convention for "killed by signal N"
        return Completed(code, _read_all(out), _read_all(err), duration, timed_out)
    finally:
        for fd in (out, err) + ((stdin,) if stdin != subprocess.DEVNULL else ()):
            os.close(fd)
