"""A small process that starts commands already under the sandbox's seccomp filter.

Commands enter a sandbox with ``nsenter``, a child of ours, not of the sandbox's init, so they
would not inherit the filter bwrap gives the sandbox. Installing it between fork and exec needs
Python code in the child, which rules out vfork and costs a full fork of the runner (milliseconds
for a large pytest process). Instead one helper per backend installs the filter on itself once
(with no_new_privs) and spawns every command: its children inherit the filter, and its spawns
are cheap because it is small. The helper exits when our end of its socket closes.

Protocol (SOCK_SEQPACKET): a request is JSON ``{"argv": [...], "env": {...}}`` with four fds
(stdin, stdout, stderr, and a reply socket); the reply socket then carries ``{"pid": N}`` and,
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
from collections.abc import Sequence

__all__ = ["Child", "Confined", "Spawner"]

_HELPER = r"""
import array, json, os, socket, subprocess, sys, threading
from pytest_sandbox.engine import seccomp as _seccomp
_seccomp.install()
ctl = socket.socket(fileno=int(sys.argv[1]))

def confine(cgroup, rlimits):
    # In the child, before exec: join the sandbox's cgroup and take its rlimits, so nothing the
    # command starts ever runs outside them.
    import resource
    for path in cgroup:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    for res, soft, hard in rlimits:
        resource.setrlimit(res, (soft, hard))

def serve(req, fds):
    reply = socket.socket(fileno=fds[3])
    try:
        try:
            cg, rl = req.get("cgroup") or [], req.get("rlimits") or []
            pre = (lambda: confine(cg, rl)) if cg or rl else None
            p = subprocess.Popen(req["argv"], stdin=fds[0], stdout=fds[1], stderr=fds[2], env=req["env"],
                                 start_new_session=True, close_fds=True, preexec_fn=pre)
        except OSError as exc:
            reply.send(json.dumps({"error": str(exc)}).encode())
            return
        finally:
            for fd in fds[:3]:
                os.close(fd)
        reply.send(json.dumps({"pid": p.pid}).encode())
        reply.send(json.dumps({"code": p.wait()}).encode())
    except OSError:
        pass
    finally:
        reply.close()

while True:
    fds = array.array("i")
    msg, anc, _, _ = ctl.recvmsg(1 << 20, socket.CMSG_LEN(4 * fds.itemsize))
    if not msg:
        break
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    threading.Thread(target=serve, args=(json.loads(msg), list(fds)), daemon=True).start()
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

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        *,
        cgroup: Sequence[str] = (),
        rlimits: Sequence[tuple[int, int, int]] = (),
    ) -> Child:
        """Start ``argv`` with those fds; it joins ``cgroup`` (its ``cgroup.procs`` files) and
        takes ``rlimits`` (resource, soft, hard) before it runs."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            req: dict[str, object] = {"argv": argv, "env": env}
            if cgroup or rlimits:
                req["cgroup"], req["rlimits"] = list(cgroup), [list(r) for r in rlimits]
            msg = json.dumps(req).encode()
            fds = array.array("i", [stdin, stdout, stderr, theirs.fileno()])
            with self._lock:
                for attempt in range(2):
                    ctl = self._ctl if self._ctl is not None and self._alive() else self._start()
                    try:
                        ctl.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                        break
                    except OSError:
                        self._ctl = None
                        if attempt:
                            raise
        finally:
            theirs.close()
        answer = json.loads(ours.recv(4096) or b'{"error": "the spawn helper died"}')
        if "pid" not in answer:
            ours.close()
            raise OSError(answer.get("error", "spawn failed"))
        return Child(ours, int(answer["pid"]))

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
    """A :class:`Spawner` whose commands join one sandbox's cgroup and rlimits (what
    ``_proc.run(spawner=...)`` takes)."""

    def __init__(self, spawner: Spawner, cgroup: Sequence[str], rlimits: Sequence[tuple[int, int, int]]) -> None:
        self._spawner = spawner
        self._cgroup = list(cgroup)
        self._rlimits = list(rlimits)

    def spawn(self, argv: list[str], env: dict[str, str], stdin: int, stdout: int, stderr: int) -> Child:
        return self._spawner.spawn(argv, env, stdin, stdout, stderr, cgroup=self._cgroup, rlimits=self._rlimits)
