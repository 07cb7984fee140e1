"""A small process that starts commands already under the sandbox's seccomp filter.

Commands enter a sandbox with ``nsenter``, a child of ours, not of the sandbox's init, so they
would not inherit the filter bwrap gives the sandbox. Installing it between fork and exec needs
Python code in the child, which rules out vfork and costs a full fork of the runner (milliseconds
for a large pytest process). Instead one helper per backend installs the filter on itself once
(with no_new_privs) and spawns every command: its children inherit the filter, and its spawns
are cheap because it is small. The helper exits when our end of its socket closes. Its program
is ``spawn_helper.py``.

Protocol (SOCK_SEQPACKET): a request is JSON ``{"argv": [...], "env": {...}}`` with four fds
(stdin, stdout, stderr, and a reply socket), and optionally a fifth that the command inherits
as fd 3 (``argv[fd_arg]`` becomes ``"3"``); the reply socket then carries ``{"pid": N}`` and,
when the command exits, ``{"code": N}`` (a negative N is a signal, as in ``Popen.returncode``).
A sandbox's own helper (:class:`Entered`) first tells ``{"took": true}`` once it has taken the
command off its socket, and ``{"pid": null}`` for a command that could not start.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeGuard

from .._proc import Start
from .spawn_helper import TOOK

__all__ = ["Child", "Confined", "Entered", "Spawner"]


_PROGRAM = "from pytest_sandbox.engine.spawn_helper import main; main()"
"""The helper's program (``spawn_helper.py``); its control socket's fd follows as its argument."""


class Child:
    """A command the helper started: its pid, an fd readable once it exits, and its exit code.

    A sandbox's own helper (:class:`Entered`) is not waited on for the pid: the command is
    started by a process that sandbox code can stop before it execs, so the pid comes as a message
    on :attr:`exit_fd` (``pid`` is None until then, and stays None for a command that could not
    start), read by :meth:`ready`, and a command given up before its pid came is :meth:`abandon`-ed."""

    def __init__(self, reply: socket.socket, pid: int | None, *, told: bool = True, pidns: str = "") -> None:
        self._reply = reply
        self._pid = pid
        self._said: int | None = None  # the pid a sandbox's own helper told, not yet trusted
        self._told = told
        self._took = told
        self._pidns = pidns
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        """Its pid; one a sandbox's own helper told is given only while it is a process of the
        sandbox's pid namespace (checked at each read, just before the runner acts on it): whatever
        the helper says, the runner never kills anything else."""
        if self._said is not None and _in_namespace(self._said, self._pidns):
            return self._said
        return self._pid

    @property
    def exit_fd(self) -> int:
        return self._reply.fileno()

    def ready(self) -> bool:
        """Call when :attr:`exit_fd` is readable: True when the command has exited (its code waits
        to be read by :meth:`wait`), False when this was news before its exit (taken, its pid).
        Raises ConnectionResetError when its helper ended before it took the command: it never
        started, and can be started another way."""
        if self._told:
            return True
        msg = self._reply.recv(4096)
        if not msg:  # the helper died
            if not self._took:
                # Before it took the command from its socket, which lives on for a moment after
                # its process is killed (so our send succeeded): the command never started.
                raise ConnectionResetError("the sandbox's helper ended before it took the command")
            self._told = True
            self.returncode = -9  # it may have started it: as if killed
            return True
        if msg == TOOK and not self._took:
            self._took = True
            return False
        answer = _answer(msg)
        self._told = True
        if "pid" not in answer:
            raise OSError(str(answer.get("error", "spawn failed")))
        pid = answer["pid"]
        if _is_pid(pid):
            self._said = pid
        return False

    def told(self, within: float) -> bool:
        """Wait up to ``within`` seconds for the message with the pid; True once it has come."""
        deadline = time.monotonic() + within
        while not self._told and self._news_by(deadline):
            self.ready()
        return self._told

    def _news_by(self, deadline: float) -> bool:
        return bool(select.select([self._reply], [], [], max(0.0, deadline - time.monotonic()))[0])

    def abandon(self) -> None:
        """Stop waiting for a command whose pid never came: its helper kills it once it learns
        its pid (when its start finishes), and it counts as killed."""
        self._told = True
        if self.returncode is None:
            self.returncode = -9
        self._reply.close()

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code (negative: the signal that killed it); with ``timeout``, one not told
        within that many seconds counts as killed, and is given up on."""
        if timeout is not None and self.returncode is None:
            deadline = time.monotonic() + timeout
            while self._news_by(deadline):
                if self.ready():
                    break
            else:
                self.abandon()
        while not self._told:
            self.ready()
        if self.returncode is None:
            msg = self._reply.recv(4096)
            code = _answer(msg).get("code") if msg else -9  # the helper died: as if killed
            if not isinstance(code, int) or isinstance(code, bool) or not -64 <= code <= 255:
                raise OSError(f"the command helper gave no exit code: {msg!r:.100}")
            self.returncode = code
            self._reply.close()
        return self.returncode

    def close(self) -> None:
        self._reply.close()


def _answer(msg: bytes) -> dict[str, object]:
    try:
        answer = json.loads(msg)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise OSError(f"the command helper answered nonsense: {msg!r:.100}")
    return answer


def _is_pid(value: object) -> TypeGuard[int]:
    """Whether a helper's answer names a process we may act on: an int, not a bool, above init."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def _in_namespace(pid: int, pidns: str) -> bool:
    if not pidns:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == pidns
    except OSError:
        return False


def _request(
    send: Callable[[bytes, array.array[int]], None],
    req: Mapping[str, object],
    before: Sequence[int],
    after: Sequence[int],
) -> socket.socket:
    """Send ``req`` with the fds ``before``, a new reply socket's and ``after``; our end of it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        send(json.dumps(req).encode(), array.array("i", [*before, theirs.fileno(), *after]))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours


def _ask(ours: socket.socket, default: str) -> dict[str, object]:
    """A helper's one answer on ``ours`` (a dead helper: an error saying ``default``)."""
    msg = ours.recv(4096)
    return _answer(msg) if msg else {"error": default}


class _Helper:
    """A helper process reached over a socket (``_send``): it starts host commands under its
    filter, and enters sandboxes; safe from any thread."""

    def _send(self, msg: bytes, fds: array.array[int]) -> None:
        raise NotImplementedError

    def spawn(self, start: Start) -> Child:
        """Start a host command with ``start``'s fds, under the helper's filter (and in its
        cgroup); ``start.extra`` is ``(fd, i)``: the command inherits ``fd`` too, as its fd 3,
        and ``argv[i]`` becomes ``"3"``. Host commands take no ``cwd``."""
        if start.cwd is not None:
            raise ValueError("host commands start where the runner is: cwd is for commands started inside")
        req: dict[str, object] = {"argv": start.argv, "env": start.env}
        if start.extra is not None:
            req["fd_arg"] = start.extra[1]
        ours = _request(self._send, req, start.stdio, start.extra[:1] if start.extra else ())
        answer = _ask(ours, "the spawn helper died")
        pid = answer.get("pid")
        if not _is_pid(pid):
            ours.close()
            raise OSError(str(answer.get("error", "spawn failed")))
        return Child(ours, pid)

    def enter(
        self,
        pidfd: int,
        root: int,
        *,
        workdir: str,
        pidns: str,
        take_root: bool,
        no_net_admin: bool,
        rlimits: Sequence[tuple[int, int]],
    ) -> Entered:
        """Have the helper fork a child that enters, for good, the sandbox whose init ``pidfd``
        names and whose root directory ``root`` is (in the helper's cgroup): the sandbox's own
        helper. ``workdir``, ``pidns``: as :class:`Entered`; ``take_root``, ``no_net_admin`` and
        ``rlimits``: as :func:`inside.join`."""
        rl = [list(r) for r in rlimits]
        req = {"op": "enter", "take_root": take_root, "no_net_admin": no_net_admin, "rlimits": rl}
        ours = self._fork(req, [pidfd, root], "the sandbox's own helper")
        return Entered(ours, workdir=workdir, pidns=pidns)

    def _fork(self, req: dict[str, object], fds: list[int], what: str) -> socket.socket:
        """Have the helper fork ``what`` (``req`` says how, ``fds`` go with it); our end of the
        new helper's socket, once it is ready."""
        ours = _request(self._send, req, (), fds)
        answer = _ask(ours, "the spawn helper died")
        if answer.get("ready") is not True:
            ours.close()
            raise OSError(str(answer.get("error", f"could not start {what}")))
        return ours


class Spawner(_Helper):
    """The helper process of one backend, started on first need (again if it died)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROGRAM, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        theirs.close()
        self._ctl = ours
        return ours

    def _send(self, msg: bytes, fds: array.array[int]) -> None:
        with self._lock:
            for attempt in range(2):
                ctl = self._ctl if self._ctl is not None and self._alive() else self._start()
                try:
                    ctl.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    return
                except OSError:
                    self._ctl = None
                    if attempt:
                        raise

    def confined(self, cgroup: Sequence[str]) -> Confined:
        """A helper of its own for one sandbox, forked from this one: it has joined ``cgroup``
        (its ``cgroup.procs`` files), so everything it starts is born inside it."""
        return Confined(self._fork({"op": "confine", "cgroup": list(cgroup)}, [], "the sandbox's helper"))

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        with self._lock:
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None
            if self._proc is not None:
                self._proc.wait()
                self._proc = None


class _Socket:
    """Our end of the control socket of a helper forked for one sandbox; closing it ends the helper."""

    def __init__(self, ctl: socket.socket) -> None:
        self._ctl: socket.socket | None = ctl
        self._lock = threading.Lock()

    def _send(self, msg: bytes, fds: array.array[int]) -> None:
        with self._lock:
            if self._ctl is None:
                raise OSError("the sandbox's helper was closed")
            self._ctl.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


class Confined(_Socket, _Helper):
    """The helper of one sandbox (see :meth:`Spawner.confined`); it exits when this is closed."""

    def close(self) -> None:
        with self._lock:
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None


class Entered(_Socket):
    """A sandbox's own helper, inside its namespaces (see ``inside.py``): each command is one
    message and one ``posix_spawn``, with its environment and directory set directly. It exits
    when this is closed, killing what it started.

    ``workdir``: where a command given no ``cwd`` starts (the sandbox's workdir, when it exists).
    ``pidns``: the sandbox's pid namespace (``/proc/PID/ns/pid``); a pid the helper tells of is
    acted on only when it is there."""

    def __init__(self, ctl: socket.socket, *, workdir: str, pidns: str) -> None:
        super().__init__(ctl)
        self.workdir = workdir
        self.pidns = pidns

    def spawn(self, start: Start) -> Child:
        """Start ``start.argv`` inside the sandbox with exactly ``start.env``, in ``start.cwd``
        (:attr:`workdir` when None); a command that cannot start exits 127 (not found), 126 (not
        runnable) or 125 (no such directory), saying why on its stderr, as a shell would."""
        if start.extra is not None:
            raise ValueError("a command started inside takes its environment directly, not as a file")
        if not start.argv:
            raise ValueError("no command to run")
        req = {"argv": start.argv, "env": start.env, "cwd": start.cwd, "workdir": self.workdir}
        return Child(_request(self._send, req, start.stdio, ()), None, told=False, pidns=self.pidns)

    def stop(self) -> None:
        """Have it kill what it started and exit (without waiting: see :meth:`close`). Until it
        has, the sandbox's pid namespace cannot end: the commands it started are its children."""
        with self._lock:
            if self._ctl is not None:
                with contextlib.suppress(OSError):
                    self._ctl.shutdown(socket.SHUT_WR)

    def close(self, wait: float = 2.0) -> None:
        """Stop it, and wait up to ``wait`` seconds until it has exited: it holds the sandbox's
        mounts while it runs."""
        with self._lock:
            ctl, self._ctl = self._ctl, None
        if ctl is None:
            return
        with contextlib.suppress(OSError):
            ctl.shutdown(socket.SHUT_WR)
            # Its end closes when it exits (nothing it starts inherits it): EOF here then.
            ctl.settimeout(wait)
            while ctl.recv(4096):
                pass
        ctl.close()
