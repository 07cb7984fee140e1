"""The program of the spawn helper (see ``spawn.py`` for why it exists and its protocol).

Run as ``python -c "from pytest_sandbox.engine.spawn_helper import main; main()" FD``, where FD
is its end of the runner's control socket; the runner imports its constants only. It installs the
sandboxes' seccomp filter on itself, then serves requests until the socket closes: a host
command (started with ``posix_spawnp``), ``confine`` (fork a helper of one sandbox, in its
cgroup) or ``enter`` (fork the sandbox's own helper, inside it: see ``inside.py``), which then
starts the sandbox's commands.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import queue
import signal
import socket
import sys
import threading
import warnings
from typing import Any

from . import inside as _inside
from . import seccomp as _seccomp

__all__ = ["TOOK", "main"]

_DEFAULT = signal.valid_signals()  # Python ignores SIGPIPE and SIGXFSZ: a command must not
TOOK = b'{"took": true}'
"""What a sandbox's own helper tells first, once it has taken a command off its socket (see
``spawn.Child.ready``)."""
Request = dict[str, Any]

_work: queue.SimpleQueue[tuple[Request, list[int]]] = queue.SimpleQueue()  # for idle workers
_idle = 0  # workers waiting on _work, each for one request
_idle_lock = threading.Lock()
_MAX_IDLE = 2  # they count against the sandbox's pids limit
_running: set[int] = set()  # pids we started that still run: killed when our lifeline closes
_entered = -1  # a sandbox's own helper, inside its namespaces (see inside.py): its init's pidfd


def _send(sock: socket.socket, answer: dict[str, object]) -> None:
    sock.send(json.dumps(answer).encode())


def _fail(fds: list[int], code: int, why: str) -> tuple[None, int]:
    # A command that could not start inside: told on its stderr with a shell's exit code.
    with contextlib.suppress(OSError):
        os.write(fds[2], why.encode("utf-8", "surrogateescape") + b"\n")
    return None, code


def _start_inside(req: Request, fds: list[int]) -> tuple[int | None, int | None]:
    argv, env, cwd = req["argv"], req["env"], req["cwd"]
    try:
        _inside.enter_pids(_entered)
        if cwd is None:  # where the sandbox started (its workdir), as nsenter -w would enter
            cwd = req["workdir"] if os.path.isdir(req["workdir"]) else "/"
        if not os.path.isdir(cwd):
            return _fail(fds, 125, f"cannot change to {cwd}: not a directory")
        path, err = _inside.resolve(argv[0], env, cwd)
        if err == errno.ENOENT:
            return _fail(fds, 127, f"{argv[0]}: command not found")
        if err:
            return _fail(fds, 126, f"{argv[0]}: {os.strerror(err)}")
        try:
            return _inside.spawn(path, argv, env, fds[:3], cwd), None
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:  # as execvp: a file with no #! line is a shell script
                raise
            return _inside.spawn("/bin/sh", ["sh", path, *argv[1:]], env, fds[:3], cwd), None
    except (OSError, ValueError) as exc:
        code = 127 if getattr(exc, "errno", None) == errno.ENOENT else 126
        return _fail(fds, code, f"{argv[0]}: cannot run: {exc}")


def _serve_inside(req: Request, fds: list[int], reply: socket.socket) -> None:
    try:
        pid, code = _start_inside(req, fds)
    finally:
        for fd in fds[:3]:
            os.close(fd)
    if pid is None:
        _send(reply, {"pid": None})
        _send(reply, {"code": code})
        return
    _running.add(pid)
    try:
        try:
            _send(reply, {"pid": pid})
        except OSError:  # the runner gave up on it (timeout, cancel) before it started
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        code = _wait(pid)
    finally:
        _running.discard(pid)
    _send(reply, {"code": code})


def _wait(pid: int) -> int:
    """``pid``'s exit code (negative: the signal that killed it), once it has exited. A command
    that made us its tracer (``PTRACE_TRACEME``) is let go at the stop it then reports, its signal
    passed on (a trap, which an exec under a tracer raises, is dropped): we are no one's debugger,
    and a stop must not end the thread that waits (see _enter)."""
    while True:
        status = os.waitpid(pid, 0)[1]
        if not os.WIFSTOPPED(status):
            return os.waitstatus_to_exitcode(status)
        sig = os.WSTOPSIG(status)
        if not _inside.untrace(pid, 0 if sig == signal.SIGTRAP else sig):
            os.kill(pid, signal.SIGKILL)


def _serve(req: Request, fds: list[int]) -> None:
    # posix_spawn, not Popen: it puts the extra fd at 3 (a shell names no fd past 9, so the
    # command could not close it otherwise). Every fd we hold is close-on-exec (received with
    # MSG_CMSG_CLOEXEC), so nothing but these four reaches the command.
    reply = socket.socket(fileno=fds[3])
    if _entered >= 0:
        try:
            _serve_inside(req, fds, reply)
        except Exception:  # a command that could not be served ends; the thread goes on
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
            pid = os.posix_spawnp(argv[0], argv, req["env"], file_actions=moves, setsid=True, setsigdef=_DEFAULT)
        except OSError as exc:
            _send(reply, {"error": str(exc)})
            return
        finally:
            for fd in fds[:3] + extra:
                os.close(fd)
        _running.add(pid)
        try:
            _send(reply, {"pid": pid})
            code = _wait(pid)
        finally:
            _running.discard(pid)
        _send(reply, {"code": code})
    except OSError:
        pass
    finally:
        reply.close()


def _end() -> None:
    # The runner closed us or died (kill -9 included): a command still running would outlive it,
    # and one that stopped itself would hold its sandbox's pid namespace open for ever (nsenter
    # never reaps its child). SIGKILL ends even a stopped process.
    for pid in list(_running):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(0)


def _forked() -> None:
    # In a child forked from the loop's thread, the only thread: the parent's commands and
    # workers stay the parent's (and a lock a worker held at the fork would never be released).
    global _work, _idle, _idle_lock
    _running.clear()
    _work, _idle, _idle_lock = queue.SimpleQueue(), 0, threading.Lock()


def _reap(pid: int) -> None:
    threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()


def _confine(req: Request, sock: socket.socket, ctl: socket.socket) -> None:
    # A helper of one sandbox: joins its cgroup once, here, so that every command it starts is
    # born inside it (moving each exec into the cgroup would cost a Python fork per exec).
    pid = os.fork()  # from this, the loop's thread: no other thread is between calls here
    if pid:
        sock.close()
        _reap(pid)
        return
    ctl.close()
    _forked()
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
        _send(sock, {"error": f"cannot confine the sandbox's helper: {exc}"})
        os._exit(1)
    _send(sock, {"ready": True})
    try:
        _loop(sock)
    finally:
        _end()


def _enter(req: Request, sock: socket.socket, ctl: socket.socket, pidfd: int, root: int) -> None:
    # The sandbox's own helper: a child that enters the sandbox once, then starts its commands.
    global _entered
    pid = os.fork()  # from the loop's thread, as in _confine: the child has this one thread
    if pid:
        sock.close()
        os.close(pidfd)
        os.close(root)
        _reap(pid)
        return
    ctl.close()
    _forked()
    try:
        _inside.join(pidfd, root, take_root=req["take_root"], no_net_admin=req["no_net_admin"], rlimits=req["rlimits"])
    except OSError as exc:
        _send(sock, {"error": f"cannot enter the sandbox: {exc}"})
        os._exit(1)
    finally:
        os.close(root)
    _seal()
    threading.stack_size(1 << 18)  # a thread here only starts and waits for one command
    try:  # under the sandbox's rlimits now, which must leave it room for a thread
        probe = threading.Thread(target=int)
        probe.start()
        probe.join()
    except RuntimeError as exc:
        _send(sock, {"error": f"no room for a thread under the sandbox's limits: {exc}"})
        os._exit(1)
    _entered = pidfd
    _send(sock, {"ready": True})
    try:
        _loop(sock)
    finally:
        _end()


def _seal() -> None:
    """Once inside: nothing of the sandbox's may become code of ours, or hold us up. Every path
    now resolves in the sandbox, host paths we know included: an import (a codec lookup imports
    through ``encodings.__path__``) would run the sandbox's files, and printing a traceback or a
    warning reads each frame's source file by its path (a coding cookie there is a codec lookup;
    a FIFO there blocks). So no import finds anything, and nothing is printed."""
    sys.path[:] = []
    sys.meta_path[:] = []
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()
    warnings.simplefilter("ignore")
    sys.excepthook = lambda *_: None
    sys.unraisablehook = lambda _: None
    threading.excepthook = lambda _: None


def _dispatch(req: Request, fds: list[int]) -> None:
    """Serve the request in a thread of its own: an idle worker's, or a new one (RuntimeError
    when there is none to be had). A command holds its thread until it exits, and sandbox code can
    hold up its start (stop it before its exec), so requests never wait for one another."""
    global _idle
    with _idle_lock:
        if _idle:
            _idle -= 1
            _work.put((req, fds))
            return
    threading.Thread(target=_worker, args=(req, fds), daemon=True).start()


def _worker(req: Request, fds: list[int]) -> None:
    # Threads are kept for the next requests (starting one costs more than a spawn); a few idle
    # ones at most.
    global _idle
    while True:
        _serve(req, fds)
        with _idle_lock:
            if _idle >= _MAX_IDLE:
                return
            _idle += 1
        req, fds = _work.get()


def _loop(ctl: socket.socket) -> None:
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
            _confine(req, socket.socket(fileno=fds[0]), ctl)
        elif req.get("op") == "enter" and _entered < 0:
            _enter(req, socket.socket(fileno=fds[0]), ctl, fds[1], fds[2])
        else:
            if _entered >= 0:  # taken: a helper that dies from here on may have started it
                with contextlib.suppress(OSError):
                    os.write(fds[3], TOOK)
            try:
                _dispatch(req, list(fds))
            except RuntimeError as exc:  # no thread to be had: the sandbox is at its pids limit
                reply = socket.socket(fileno=fds[3])
                _send(reply, {"error": f"cannot start a command: {exc} (at the pids limit?)"})
                reply.close()
                for fd in fds[:3] + fds[4:]:
                    os.close(fd)


def main() -> None:
    """Serve the control socket whose fd is ``sys.argv[1]`` until it closes."""
    _seccomp.install()
    # Commands are started with posix_spawn, which closes only close-on-exec fds: everything we
    # hold must be, above all our control socket (a command holding it could have us start
    # anything, outside its sandbox). Received fds come close-on-exec (MSG_CMSG_CLOEXEC).
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(int(fd), False)
    try:
        _loop(socket.socket(fileno=int(sys.argv[1])))
    finally:
        _end()
