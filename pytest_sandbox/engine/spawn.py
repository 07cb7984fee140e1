"""A small process that starts commands already under the sandbox's seccomp filter.

Commands enter a sandbox with ``nsenter``, a child of ours, not of the sandbox's init, so they
would not inherit the filter bwrap gives the sandbox. Installing it between fork and exec needs
Python code in the child, which rules out vfork and costs a full fork of the runner (milliseconds
for a large pytest process). Instead one helper per backend installs the filter on itself once
(with no_new_privs) and spawns every command: its children inherit the filter, and its spawns
are cheap because it is small. The helper exits when our end of its socket closes.

Protocol (SOCK_SEQPACKET): a request is JSON ``{"argv": [...], "env": {...}}`` with four fds
(stdin, stdout, stderr, and a reply socket), and optionally a fifth that the command inherits
as fd 3 (``argv[fd_arg]`` becomes ``"3"``); the reply socket then carries ``{"pid": N}`` and,
when the command exits, ``{"code": N}`` (a negative N is a signal, as in ``Popen.returncode``).
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

__all__ = ["Child", "Confined", "Extra", "Spawner"]

Extra = tuple[int, int] | None
"""An fd a command inherits beyond stdin, stdout and stderr, and the argv index of its number."""

_HELPER = r"""
import array, json, os, socket, sys, threading
from pytest_sandbox.engine import seccomp as _seccomp
_seccomp.install()
# Commands are started with posix_spawn, which closes only close-on-exec fds: everything we hold
# must be, above all our control socket (a command holding it could have us start anything,
# outside its sandbox). Received fds come close-on-exec (MSG_CMSG_CLOEXEC).
for _fd in os.listdir("/proc/self/fd"):
    if int(_fd) > 2:
        try:
            os.set_inheritable(int(_fd), False)
        except OSError:
            pass
running = set()  # pids we started that still run: killed when our lifeline closes

def serve(req, fds):
    # posix_spawn, not Popen: it puts the extra fd at 3 (a shell names no fd past 9, so the
    # command could not close it otherwise). Every fd we hold is close-on-exec (received with
    # MSG_CMSG_CLOEXEC), so nothing but these four reaches the command.
    reply = socket.socket(fileno=fds[3])
    try:
        argv, extra = req["argv"], fds[4:5]
        moves = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds[:3])]
        if extra:
            argv[req["fd_arg"]] = "3"
            moves.append((os.POSIX_SPAWN_DUP2, extra[0], 3))
        try:
            pid = os.posix_spawnp(argv[0], argv, req["env"], file_actions=moves, setsid=True)
        except OSError as exc:
            reply.send(json.dumps({"error": str(exc)}).encode())
            return
        finally:
            for fd in fds[:3] + extra:
                os.close(fd)
        running.add(pid)
        try:
            reply.send(json.dumps({"pid": pid}).encode())
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        finally:
            running.discard(pid)
        reply.send(json.dumps({"code": code}).encode())
    except OSError:
        pass
    finally:
        reply.close()

def end():
    # The runner closed us or died (kill -9 included): a command still running would outlive it,
    # and one that stopped itself would hold its sandbox's pid namespace open for ever (nsenter
    # never reaps its child). SIGKILL ends even a stopped process.
    for pid in list(running):
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    os._exit(0)

def confine(req, sock, ctl):
    # A helper of one sandbox: joins its cgroup once, here, so that every command it starts is
    # born inside it (moving each exec into the cgroup would cost a Python fork per exec).
    pid = os.fork()  # from this, the loop's thread: no other thread is between calls here
    if pid:
        sock.close()
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
        return
    ctl.close()
    running.clear()  # the parent's commands stay the parent's
    try:  # the OOM killer must pick what the sandbox runs, never the helper that starts it
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
    try:
        for path in req["cgroup"]:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
    except OSError as exc:
        sock.send(json.dumps({"error": f"cannot confine the sandbox's helper: {exc}"}).encode())
        os._exit(1)
    sock.send(b'{"ready": true}')
    try:
        loop(sock)
    finally:
        end()

def loop(ctl):
    while True:
        fds = array.array("i")
        msg, anc, _, _ = ctl.recvmsg(1 << 20, socket.CMSG_LEN(5 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        if not msg:
            break
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        req = json.loads(msg)
        if req.get("op") == "confine":
            confine(req, socket.socket(fileno=fds[0]), ctl)
        else:
            try:
                threading.Thread(target=serve, args=(req, list(fds)), daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: the sandbox is at its pids limit
                reply = socket.socket(fileno=fds[3])
                reply.send(json.dumps({"error": f"cannot start a command: {exc} (at the pids limit?)"}).encode())
                reply.close()
                for fd in fds[:3] + fds[4:]:
                    os.close(fd)

try:
    loop(socket.socket(fileno=int(sys.argv[1])))
finally:
    end()
"""


class Child:
    """A command the helper started: its pid, an fd readable once it exits, and its exit code."""

    def __init__(self, reply: socket.socket, pid: int) -> None:
        self._reply = reply
        self.pid = pid
        self.returncode: int | None = None

    @property
    def exit_fd(self) -> int:
        return self._reply.fileno()

    def wait(self) -> int:
        if self.returncode is None:
            msg = self._reply.recv(4096)
            self.returncode = int(json.loads(msg)["code"]) if msg else -9  # the helper died: as if killed
            self._reply.close()
        return self.returncode

    def close(self) -> None:
        self._reply.close()


class Spawner:
    """The helper process of one backend; :meth:`spawn` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _HELPER, str(theirs.fileno())],
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

    def spawn(
        self, argv: list[str], env: dict[str, str], stdin: int, stdout: int, stderr: int, extra: Extra = None
    ) -> Child:
        """Start ``argv`` with those fds, under the helper's filter; ``extra`` is ``(fd, i)``: the
        command inherits ``fd`` too, as its fd 3, and ``argv[i]`` becomes ``"3"``."""
        return _spawn(self._send, argv, env, (stdin, stdout, stderr), extra)

    def confined(self, cgroup: Sequence[str]) -> Confined:
        """A helper of its own for one sandbox, forked from this one: it has joined ``cgroup``
        (its ``cgroup.procs`` files), so everything it starts is born inside it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            msg = json.dumps({"op": "confine", "cgroup": list(cgroup)})
            self._send(msg.encode(), array.array("i", [theirs.fileno()]))
        finally:
            theirs.close()
        answer = json.loads(ours.recv(4096) or b'{"error": "the spawn helper died"}')
        if not answer.get("ready"):
            ours.close()
            raise OSError(answer.get("error", "could not start the sandbox's helper"))
        return Confined(ours)

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


class Confined:
    """The helper of one sandbox (see :meth:`Spawner.confined`); it exits when this is closed."""

    def __init__(self, ctl: socket.socket) -> None:
        self._ctl: socket.socket | None = ctl
        self._lock = threading.Lock()

    def _send(self, msg: bytes, fds: array.array[int]) -> None:
        with self._lock:
            if self._ctl is None:
                raise OSError("the sandbox's helper was closed")
            self._ctl.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])

    def spawn(
        self, argv: list[str], env: dict[str, str], stdin: int, stdout: int, stderr: int, extra: Extra = None
    ) -> Child:
        """Start ``argv`` with those fds, in the sandbox's cgroup and rlimits (``extra``: as
        :meth:`Spawner.spawn`)."""
        return _spawn(self._send, argv, env, (stdin, stdout, stderr), extra)

    def close(self) -> None:
        with self._lock:
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None


def _spawn(
    send: Callable[[bytes, array.array[int]], None],
    argv: list[str],
    env: dict[str, str],
    fds: tuple[int, int, int],
    extra: Extra,
) -> Child:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    req: dict[str, object] = {"argv": argv, "env": env}
    passed = [*fds, theirs.fileno()]
    if extra is not None:
        passed.append(extra[0])
        req["fd_arg"] = extra[1]
    try:
        send(json.dumps(req).encode(), array.array("i", passed))
    finally:
        theirs.close()
    answer = json.loads(ours.recv(4096) or b'{"error": "the spawn helper died"}')
    if "pid" not in answer:
        ours.close()
        raise OSError(answer.get("error", "spawn failed"))
    return Child(ours, int(answer["pid"]))
