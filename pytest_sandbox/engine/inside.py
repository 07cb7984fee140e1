"""The exec fast path: a sandbox's own command helper, inside its namespaces, starting commands.

Entering a sandbox per command costs two ``nsenter`` stages and a ``/bin/sh`` (about 5 ms). Instead,
the sandbox's helper (see ``spawn.py``) forks a child that enters the sandbox once: its user,
mount, UTS, IPC, network, cgroup and pid namespaces, its root, root's ids there, and, with a
network to the outside, no raw sockets or routes, as a command entering by ``nsenter`` would have.
That child then starts each command with one ``posix_spawn``: born in the sandbox's pid namespace
and cgroup, with its argv, environment and working directory set directly (the sandbox's own
dynamic loader is the only one that sees the environment), in a session of its own.

Why this does not widen the boundary:

* The child is outside the sandbox's pid namespace: no process inside can see, signal or ptrace it.
  It holds nothing of the host's but its control socket, which only the runner holds the other
  end of. Once inside, every path it names resolves in the sandbox, host paths it knows
  included, so it seals itself (``spawn_helper._seal``): no import finds anything (a codec lookup
  imports through ``encodings.__path__``) and nothing is printed (a traceback or a warning reads
  each frame's source file by its path); no file of the sandbox's becomes code of its.
* A command may make it its tracer (``PTRACE_TRACEME``): the stop it then reports is let go, its
  signal passed on; the helper is no one's debugger, and its waiting thread goes on.
* Its ``posix_spawn`` is a vfork: until the command execs, the new process (already in the
  sandbox's pid namespace) shares the helper's memory. The helper is not dumpable, and its memory
  belongs to the host's user namespace, so sandbox code (root only in its own) can neither ptrace
  that process nor read its ``/proc`` files; it can only kill or stop it, as it can any command.
* It is under the sandbox's seccomp filter (inherited from the helper it forks from), in its
  cgroup, and, where rlimits stand in for cgroups, under its rlimits, which its commands inherit.

The runner does not wait on it for more than it waits on a command: it learns the command's pid
from it, kills the command's tree on timeout or cancel, and bounds what it reads (``_proc.run``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import stat
from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_PATH", "enter_pids", "join", "resolve", "spawn", "untrace"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The search path for a command when its environment has no ``PATH``."""

_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
# All but the pid namespace: a process whose children would be born in another pid namespace can
# start no thread (clone refuses CLONE_THREAD then), so each thread that starts commands enters it
# for itself (enter_pids), and the helper's main thread stays free to start threads.
_ALL = _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWNET | _CLONE_NEWCGROUP
_M_ARENA_MAX = -8
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_NET_ADMIN = 12
_CAP_NET_RAW = 13
_CAP_VERSION_3 = 0x20080522
_PTRACE_DETACH = 17
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def join(pidfd: int, root: int, *, take_root: bool, no_net_admin: bool, rlimits: Sequence[tuple[int, int]]) -> None:
    """Enter, for good, the namespaces of the process ``pidfd`` names (but its pid namespace: see
    :func:`enter_pids`) and the root directory ``root`` (an fd of its ``/proc/PID/root``); this
    process must have one thread.

    ``take_root``: become root inside (the runner is root on the host, which is no one inside);
    rootless, the runner's ids already are root inside. ``no_net_admin``: no raw sockets or network
    administration for anything started from here on. ``rlimits``: ``(resource, value)`` pairs, set
    hard, for this process and what it starts."""
    _check(_libc.setns(pidfd, _ALL), "enter the sandbox's namespaces")
    _check(_libc.fchdir(root), "enter the sandbox's root")
    _check(_libc.chroot(b"."), "enter the sandbox's root")
    os.chdir("/")
    if take_root:
        with contextlib.suppress(PermissionError):  # denied in this user namespace: none to drop then
            os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    if no_net_admin:
        for cap in (_CAP_NET_ADMIN, _CAP_NET_RAW):
            _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "drop network administration")
        header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
        _check(_libc.capget(ctypes.byref(header), data), "read capabilities")
        data[0].inheritable &= ~((1 << _CAP_NET_ADMIN) | (1 << _CAP_NET_RAW))
        _check(_libc.capset(ctypes.byref(header), data), "drop network administration")
        _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "drop ambient capabilities")
    if any(res == resource.RLIMIT_AS for res, _ in rlimits):
        # Under an address-space limit of its own: one malloc arena, not one per thread (each
        # reserves 64 MiB of addresses); threads get small stacks (see spawn.py).
        _libc.mallopt(_M_ARENA_MAX, 1)
    for res, value in rlimits:
        resource.setrlimit(res, (value, value))
    # Changing ids makes a process undumpable already; rootless, nothing did.
    _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "make the helper undumpable")


def untrace(pid: int, sig: int) -> bool:
    """Let go of ``pid``, a child that made this process its tracer (``PTRACE_TRACEME``) and is in
    a trace stop, delivering ``sig`` to it (0: none); False when it could not be."""
    return bool(_libc.ptrace(_PTRACE_DETACH, pid, None, sig) == 0)


def enter_pids(pidfd: int) -> None:
    """Have the processes this thread starts born in the pid namespace of the process ``pidfd``
    names (the sandbox's init). A thread that has can start no thread itself."""
    _check(_libc.setns(pidfd, _CLONE_NEWPID), "enter the sandbox's pid namespace")


def resolve(name: str, env: Mapping[str, str], cwd: str) -> tuple[str, int]:
    """The file ``name`` runs, as ``execvp`` finds it through the command's own ``PATH``, looked up
    in the sandbox (this process's root): ``(path, 0)``, or ``("", errno)`` when none can run."""
    if "/" in name:
        return (name if name.startswith("/") else os.path.join(cwd, name)), 0
    if not name:
        return "", errno.ENOENT
    seen = errno.ENOENT
    for d in (env.get("PATH") or DEFAULT_PATH).split(":"):
        path = os.path.join(d or ".", name) if (d or ".").startswith("/") else os.path.join(cwd, d or ".", name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path, 0
        seen = errno.EACCES
    return "", seen


_sigset = ctypes.c_byte * 128
_attr_buf = ctypes.c_byte * 1024  # posix_spawnattr_t: 336 bytes on x86_64, less elsewhere
_actions_buf = ctypes.c_byte * 256  # posix_spawn_file_actions_t: 80 bytes on x86_64


def spawn(path: str, argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int], cwd: str) -> int:
    """Start ``path`` with ``argv`` and exactly ``env``, ``fds`` as its stdin, stdout and stderr, in
    ``cwd``, as the leader of a new session, with every signal at its default and none blocked
    (this process ignores SIGPIPE, as Python does). Returns its pid; raises OSError (errno) when it
    could not start: the directory or the file, which the caller tells apart beforehand."""
    attr, actions = _attr_buf(), _actions_buf()
    _check(_libc.posix_spawnattr_init(attr), "posix_spawnattr_init")
    _check(_libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    try:
        every, none = _sigset(), _sigset()
        _libc.sigfillset(every)
        _libc.sigemptyset(none)
        flags = _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK
        _check(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)), "posix_spawnattr_setflags")
        _check(_libc.posix_spawnattr_setsigdefault(attr, every), "posix_spawnattr_setsigdefault")
        _check(_libc.posix_spawnattr_setsigmask(attr, none), "posix_spawnattr_setsigmask")
        for i, fd in enumerate(fds):
            _check(_libc.posix_spawn_file_actions_adddup2(actions, fd, i), "posix_spawn_file_actions_adddup2")
        _check(_libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd)), "addchdir")
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
        items = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
        c_env = (ctypes.c_char_p * (len(items) + 1))(*items, None)
        pid = ctypes.c_int(0)
        err = _libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions, attr, c_argv, c_env)
        if err:
            raise OSError(err, os.strerror(err))
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attr)
