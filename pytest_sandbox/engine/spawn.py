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
from collections.abc import Callable, Sequence

__all__ = ["Child", "Confined", "Entered", "Extra", "Spawner", "enter"]

Extra = tuple[int, int] | None
"""An fd a command inherits beyond stdin, stdout and stderr, and the argv index of its number."""

_HELPER = r"""
import array, errno, json, os, signal, socket, sys, threading
from pytest_sandbox.engine import inside as _inside, seccomp as _seccomp
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
DEFAULT = signal.valid_signals()  # what we ignore (SIGPIPE, SIGXFSZ, as Python does), a command must not
TOOK = b'{"took": true}'  # told first, once a command is taken (see Child.ready)
running = set()  # pids we started that still run: killed when our lifeline closes
entered = -1  # a sandbox's own helper, inside its namespaces (see inside.py): its init's pidfd

def fail(fds, code, why):
    # A command that could not start inside: told on its stderr with a shell's exit code.
    try:
        os.write(fds[2], why.encode("utf-8", "surrogateescape") + b"\n")
    except OSError:
        pass
    return None, code

def start_inside(req, fds):
    argv, env, cwd = req["argv"], req["env"], req["cwd"]
    try:
        _inside.enter_pids(entered)
        if cwd is None:  # where the sandbox started (its workdir), as nsenter -w would enter
            cwd = req["workdir"] if os.path.isdir(req["workdir"]) else "/"
        if not os.path.isdir(cwd):
            return fail(fds, 125, f"cannot change to {cwd}: not a directory")
        path, err = _inside.resolve(argv[0], env, cwd)
        if err == errno.ENOENT:
            return fail(fds, 127, f"{argv[0]}: command not found")
        if err:
            return fail(fds, 126, f"{argv[0]}: {os.strerror(err)}")
        try:
            return _inside.spawn(path, argv, env, fds[:3], cwd), None
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:  # as execvp: a file with no #! line is a shell script
                raise
            return _inside.spawn("/bin/sh", ["sh", path, *argv[1:]], env, fds[:3], cwd), None
    except (OSError, ValueError) as exc:
        code = 127 if getattr(exc, "errno", None) == errno.ENOENT else 126
        return fail(fds, code, f"{argv[0]}: cannot run: {exc}")

def serve_inside(req, fds, reply):
    try:
        pid, code = start_inside(req, fds)
    finally:
        for fd in fds[:3]:
            os.close(fd)
    if pid is None:
        reply.send(json.dumps({"pid": None}).encode())
        reply.send(json.dumps({"code": code}).encode())
        return
    running.add(pid)
    try:
        try:
            reply.send(json.dumps({"pid": pid}).encode())
        except OSError:  # the runner gave up on it (timeout, cancel) before it started
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        running.discard(pid)
    reply.send(json.dumps({"code": code}).encode())

def serve(req, fds):
    # posix_spawn, not Popen: it puts the extra fd at 3 (a shell names no fd past 9, so the
    # command could not close it otherwise). Every fd we hold is close-on-exec (received with
    # MSG_CMSG_CLOEXEC), so nothing but these four reaches the command.
    reply = socket.socket(fileno=fds[3])
    if entered >= 0:
        try:
            serve_inside(req, fds, reply)
        except OSError:
            pass
        finally:
            reply.close()
        return
    try:
        argv, extra = req["argv"], fds[4:5]
        moves = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds[:3])]
        if extra:
            argv[req["fd_arg"]] = "3"
            moves.append((os.POSIX_SPAWN_DUP2, extra[0], 3))
        try:
            pid = os.posix_spawnp(argv[0], argv, req["env"], file_actions=moves, setsid=True, setsigdef=DEFAULT)
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

def enter(req, sock, ctl, pidfd, root):
    # The sandbox's own helper: a child that enters the sandbox once, then starts its commands.
    global entered
    pid = os.fork()  # from the loop's thread, as in confine: the child has this one thread
    if pid:
        sock.close()
        os.close(pidfd)
        os.close(root)
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
        return
    ctl.close()
    running.clear()
    try:
        _inside.join(
            pidfd, root, take_root=req["take_root"], no_net_admin=req["no_net_admin"], rlimits=req["rlimits"]
        )
    except OSError as exc:
        sock.send(json.dumps({"error": f"cannot enter the sandbox: {exc}"}).encode())
        os._exit(1)
    finally:
        os.close(root)
    sys.path[:] = []  # nothing is imported from here on: the files around us are the sandbox's
    threading.stack_size(1 << 18)  # a thread here only starts and waits for one command
    try:  # under the sandbox's rlimits now, which must leave it room for a thread
        probe = threading.Thread(target=int)
        probe.start()
        probe.join()
    except RuntimeError as exc:
        sock.send(json.dumps({"error": f"no room for a thread under the sandbox's limits: {exc}"}).encode())
        os._exit(1)
    entered = pidfd
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
        elif req.get("op") == "enter" and entered < 0:
            enter(req, socket.socket(fileno=fds[0]), ctl, fds[1], fds[2])
        else:
            if entered >= 0:  # taken: a helper that dies from here on may have started it
                try:
                    os.write(fds[3], TOOK)
                except OSError:
                    pass
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
    """A command the helper started: its pid, an fd readable once it exits, and its exit code.

    A sandbox's own helper (:class:`Entered`) is not waited on for the pid: the command is
    started by a process that sandbox code can stop before it execs, so the pid comes as a message
    on :attr:`exit_fd` (``pid`` is None until then, and stays None for a command that could not
    start), read by :meth:`ready`, and a command given up before its pid came is :meth:`abandon`-ed."""

    def __init__(self, reply: socket.socket, pid: int | None, *, told: bool = True, pidns: str = "") -> None:
        self._reply = reply
        self.pid = pid
        self._told = told
        self._took = told
        self._pidns = pidns
        self.returncode: int | None = None

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
        answer = _answer(msg)
        if answer == {"took": True} and not self._took:
            self._took = True
            return False
        self._told = True
        if "pid" not in answer:
            raise OSError(str(answer.get("error", "spawn failed")))
        pid = answer["pid"]
        # Acted on only when it is a process of the sandbox's pid namespace: whatever the helper
        # says, the runner never kills (or waits on) anything else.
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1 and _in_namespace(pid, self._pidns):
            self.pid = pid
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


def _in_namespace(pid: int, pidns: str) -> bool:
    if not pidns:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == pidns
    except OSError:
        return False


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
        self,
        argv: list[str],
        env: dict[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        extra: Extra = None,
        cwd: str | None = None,
    ) -> Child:
        """Start ``argv`` with those fds, under the helper's filter; ``extra`` is ``(fd, i)``: the
        command inherits ``fd`` too, as its fd 3, and ``argv[i]`` becomes ``"3"``. Host commands
        take no ``cwd``."""
        _no_cwd(cwd)
        return _spawn(self._send, argv, env, (stdin, stdout, stderr), extra)

    def enter(
        self, pidfd: int, root: int, *, take_root: bool, no_net_admin: bool, rlimits: Sequence[tuple[int, int]]
    ) -> Entered:
        """A helper of the sandbox whose init ``pidfd`` names, inside it (see :func:`enter`)."""
        return enter(self._send, pidfd, root, take_root=take_root, no_net_admin=no_net_admin, rlimits=rlimits)

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
        self,
        argv: list[str],
        env: dict[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        extra: Extra = None,
        cwd: str | None = None,
    ) -> Child:
        """Start ``argv`` with those fds, in the sandbox's cgroup and rlimits (``extra``: as
        :meth:`Spawner.spawn`)."""
        _no_cwd(cwd)
        return _spawn(self._send, argv, env, (stdin, stdout, stderr), extra)

    def enter(
        self, pidfd: int, root: int, *, take_root: bool, no_net_admin: bool, rlimits: Sequence[tuple[int, int]]
    ) -> Entered:
        """A helper of the sandbox whose init ``pidfd`` names, inside it, and in its cgroup (see
        :func:`enter`)."""
        return enter(self._send, pidfd, root, take_root=take_root, no_net_admin=no_net_admin, rlimits=rlimits)

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


class Entered(Confined):
    """A sandbox's own helper, inside its namespaces (see ``inside.py``): each command is one
    message and one ``posix_spawn``, with its environment and directory set directly. It exits
    when this is closed, killing what it started."""

    workdir = "/"
    """Where a command given no ``cwd`` starts (the sandbox's workdir), when it exists."""
    pidns = ""
    """The sandbox's pid namespace (``/proc/PID/ns/pid``): a pid the helper tells of is acted on
    only when it is there."""

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        extra: Extra = None,
        cwd: str | None = None,
    ) -> Child:
        """Start ``argv`` inside the sandbox with exactly ``env``, in ``cwd`` (:attr:`workdir` when None);
        a command that cannot start exits 127 (not found), 126 (not runnable) or 125 (no such
        directory), saying why on its stderr, as a shell would."""
        if extra is not None:
            raise ValueError("a command started inside takes its environment directly, not as a file")
        if not argv:
            raise ValueError("no command to run")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        req = {"argv": argv, "env": env, "cwd": cwd, "workdir": self.workdir}
        try:
            self._send(json.dumps(req).encode(), array.array("i", [stdin, stdout, stderr, theirs.fileno()]))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return Child(ours, None, told=False, pidns=self.pidns)

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


def enter(
    send: Callable[[bytes, array.array[int]], None],
    pidfd: int,
    root: int,
    *,
    take_root: bool,
    no_net_admin: bool,
    rlimits: Sequence[tuple[int, int]],
) -> Entered:
    """Have a helper fork a child that enters, for good, the sandbox whose init ``pidfd`` names
    and whose root directory ``root`` is; ``take_root``, ``no_net_admin`` and ``rlimits``: as
    :func:`inside.join`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        rl = [list(r) for r in rlimits]
        req = {"op": "enter", "take_root": take_root, "no_net_admin": no_net_admin, "rlimits": rl}
        send(json.dumps(req).encode(), array.array("i", [theirs.fileno(), pidfd, root]))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    answer = json.loads(ours.recv(4096) or b'{"error": "the spawn helper died"}')
    if not answer.get("ready"):
        ours.close()
        raise OSError(answer.get("error", "could not start the sandbox's own helper"))
    return Entered(ours)


def _no_cwd(cwd: str | None) -> None:
    if cwd is not None:
        raise ValueError("host commands start where the runner is: cwd is for commands started inside")
