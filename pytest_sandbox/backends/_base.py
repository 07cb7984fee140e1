"""What every backend's sandbox shares: the one implementation of the parts of the
:class:`~pytest_sandbox.types.Sandbox` protocol that do not depend on where the sandbox runs
(``with``, the closed check, ``exec`` as an argv, results and history), plus the helpers the
remote backends use to speak to a sandbox through a shell."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import posixpath
import shlex
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .. import _proc, _services
from .._build import host_ca_bundle
from .._hostfs import HostTree
from .._lifeline import Watchdog
from .._offload import stoppable
from ..errors import (
    ConfigError,
    EngineUnavailableError,
    ExecTimeoutError,
    SandboxClosedError,
    SandboxError,
    SandboxFileError,
)
from ..image import Image, Service, check_argv, env_items
from ..store import Store
from ..types import LABEL, Backend, ExecResult, FileInfo, LogCallback, Sandbox, ServiceStatus, Snapshot

LOGIN_SHELL = ["/bin/sh", "-c", "exec bash -l 2>/dev/null || exec sh -l"]
"""What ``interactive()`` runs when given no command."""
# ``stat`` of $1 ($2 = 1: symlinks followed) as "hexmode size mtime uid gid", for FileInfo.
STAT_SH = 'f="%f %s %Y %u %g"; if [ "$2" = 1 ]; then exec stat -L -c "$f" -- "$1"; fi; exec stat -c "$f" -- "$1"'

_HISTORY_TAIL = 4096  # characters of each stream a sandbox's history keeps (the failure report shows less)

__all__ = [
    "LABEL",
    "BackendBase",
    "RemoteBackend",
    "KILL_TREE_SH",
    "LOGIN_SHELL",
    "STAT_SH",
    "stat_info",
    "SandboxBase",
    "exec_argv",
    "exec_cwd",
    "exec_env",
    "exec_result",
    "extract_tar",
    "file_error",
    "refuse_live",
    "resolve_snapshot",
    "sandbox_path",
    "wait_stoppable",
]

# Kill a process and every descendant, found through /proc (no ps needed in the image). As
# _lifeline.kill_tree does on the host: the tree is stopped first, until two scans in a row find
# nobody new and every process found is seen stopped, so a command forking as fast as it can is
# caught whole (the glob lists the pids before cat reads their states: a parent seen stopped may
# have forked after the listing, and only the next scan has its child).
# Each scan is one cat and one awk: "N pid" for a process not stopped by us yet, "R" while one we
# stopped is still running (in the middle of a fork when the signal came). The shell's kill:
# images may lack /bin/kill.
_TREE_AWK = (
    '{pid = $1; sub(/.*\\) /, ""); st[pid] = $1; pp[pid] = $2} '
    "END {k[r] = 1; do {c = 0; for (p in pp) if ((pp[p] in k) && !(p in k)) {k[p] = 1; c++}} while (c); "
    'split(s, a, " "); for (i in a) old[a[i]] = 1; '
    # A root whose parent is outside the namespace (nsenter's child) is not stopped: nsenter would
    # stop itself in turn and never return. Such a root is one of our shells, which forks nothing.
    "for (p in k) if ((p in st) && !(p == r && pp[p] == 0)) "
    '{if (!(p in old)) print "N", p; else if (st[p] !~ /^[TtZX]/ && !vfork(p, st[p])) print "R"}} '
    # A parent waiting in vfork() for a child we stopped (D in kernel_clone) forks no more.
    'function vfork(p, s,  w, f) {if (s != "D") return 0; w = ""; f = "/proc/" p "/wchan"; '
    'getline w < f; close(f); return w == "kernel_clone"}'
)
KILL_TREE_SH = (
    # Only a real process below init: a pid file read before it was written gives no pid at all.
    "r=$1; case $r in ''|*[!0-9]*|0|1) exit 0 ;; esac; "
    'stopped=" "; q=; n=0; while [ $n -lt 2000 ]; do '
    f'out=$(cat /proc/[0-9]*/stat 2>/dev/null | awk -v r="$r" -v s="$stopped" \'{_TREE_AWK}\'); '
    'if [ -z "$out" ]; then [ -n "$q" ] && break; q=1; continue; fi; q=; set -- $out; while [ $# -gt 0 ]; do '
    'if [ "$1" = N ]; then kill -STOP $2 2>/dev/null; stopped="$stopped$2 "; shift; fi; shift; done; '
    "n=$((n + 1)); done; "
    # The root last: whoever waits for it (the Daytona wrapper) may kill this script once it is gone.
    'for p in $stopped; do [ "$p" = "$r" ] || kill -KILL $p 2>/dev/null; done; kill -KILL $r 2>/dev/null; '
    # Dead when this returns: a killed process lingers a moment before it exits (on a loaded machine,
    # a thousand of them take seconds), so the wait is up to a minute in all.
    "m=0; for p in $stopped; do while [ $m -lt 6000 ] && read -r l </proc/$p/stat 2>/dev/null; do "
    'case "${l##*) }" in Z*|X*) break ;; esac; m=$((m + 1)); sleep 0.01; done; done; true'
)


def refuse_live(backend: str, instead: str) -> EngineUnavailableError:
    """What ``snapshot(live=True)`` raises on a backend that keeps files only."""
    return EngineUnavailableError(
        f"live snapshots (running processes kept, memory included) are the local engine's, as root with CRIU 4.2 "
        f"or newer; the {backend} backend keeps files: {instead}"
    )


def resolve_snapshot(backend: Backend, what: Snapshot | Image | str) -> Snapshot:
    """What ``create()`` accepts, as a snapshot of ``backend``: an Image is built, a string looked up."""
    if isinstance(what, Image):
        return backend.build(what)
    if isinstance(what, str):
        return backend.get_snapshot(what)
    if not isinstance(what, Snapshot):
        raise ConfigError(f"create() takes a Snapshot, an Image or a key, got {what!r}")
    if what.backend != backend.name:
        raise ConfigError(f"snapshot {what.short} belongs to the {what.backend} backend")
    return what


def exec_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """``exec()``'s ``env``, checked (:func:`~pytest_sandbox.image.env_items`)."""
    return dict(env_items(env)) if env else None


def exec_cwd(cwd: str | None) -> str | None:
    """``exec()``'s ``cwd``, checked: a string without NUL, or None."""
    return None if cwd is None else check_argv([cwd], "exec() cwd")[0]


def exec_argv(command: str | Sequence[str]) -> list[str]:
    """``exec()``'s command as an argv: a string runs through ``/bin/sh -c``."""
    if isinstance(command, str):
        return check_argv(["/bin/sh", "-c", command], "exec()")
    argv = list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"exec() takes a string or a non-empty list of strings, got {command!r}")
    return check_argv(argv, "exec()")


def exec_result(
    history: list[ExecResult],
    argv: Sequence[str],
    *,
    exit_code: int,
    stdout: bytes,
    stderr: bytes,
    duration: float,
    timed_out: bool,
    timeout: float | None,
    truncated: bool = False,
    max_output: int | None = None,
    oom_killed: bool = False,
) -> ExecResult:
    """Record one exec in a sandbox's history; raise :class:`ExecTimeoutError` if it timed out.

    Output longer than ``max_output`` (default :data:`DEFAULT_MAX_OUTPUT`) per stream is cut
    in the middle with a marker. The history keeps each command's output tail only: a sandbox
    running thousands of commands must not hold all their output.
    """
    limit = _proc.DEFAULT_MAX_OUTPUT if max_output is None else max_output
    stdout, cut_out = _proc.clip(stdout, limit)
    stderr, cut_err = _proc.clip(stderr, limit)
    shown = argv[2] if len(argv) == 3 and list(argv[:2]) == ["/bin/sh", "-c"] else shlex.join(argv)
    result = ExecResult(
        command=shown,
        exit_code=exit_code,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
        duration=duration,
        timed_out=timed_out,
        truncated=truncated or cut_out or cut_err,
        oom_killed=oom_killed,
    )
    history.append(
        dataclasses.replace(result, stdout=result.stdout[-_HISTORY_TAIL:], stderr=result.stderr[-_HISTORY_TAIL:])
    )
    if timed_out:
        raise ExecTimeoutError(
            result,
            f"`{shown}` timed out after {timeout}s; its whole process tree was killed "
            "(the sandbox itself is still usable)",
        )
    return result


def extract_tar(tf: tarfile.TarFile, dest: Path, max_size: int, path: str) -> None:
    """Unpack a tar whose first path component is the downloaded item into ``dest``, with
    :class:`HostTree`'s rules: symlinks recreated, never followed (nor ones already on the host),
    no member outside ``dest``, no setuid or setgid, FIFOs and devices skipped, ``max_size``."""
    tree = HostTree(dest, max_size, path)
    try:
        for member in tf:
            parts = tuple(member.name.split("/")[1:])
            if any(p in ("..", "", ".") for p in parts) or member.name.startswith("/"):
                continue
            if member.isdir():
                tree.directory(parts, member.mode)
            elif member.issym():
                tree.symlink(parts, member.linkname)
            elif member.isfile():
                tree.file(parts, member.mode, tf.extractfile(member))
    finally:
        tree.close()


def stat_info(out: bytes | str, path: str) -> FileInfo:
    """The :class:`FileInfo` in what :data:`STAT_SH` printed."""
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    try:
        mode, size, mtime, uid, gid = text.split()
        return FileInfo(int(mode, 16), int(size), float(mtime), int(uid), int(gid))
    except ValueError as exc:
        raise SandboxFileError(errno.EIO, f"stat {path}: unexpected output {text[:200]!r}") from exc


def sandbox_path(path: str) -> str:
    """A sandbox path, normalised; relative paths are refused (they would depend on a cwd)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"sandbox paths are absolute, like '/work/file.txt'; got {path!r}")
    return posixpath.normpath(path).replace("//", "/")


_ERRNO = (
    ("no such file", errno.ENOENT),
    ("not found", errno.ENOENT),
    ("not a directory", errno.ENOTDIR),
    ("is a directory", errno.EISDIR),
    ("not empty", errno.ENOTEMPTY),
    ("exists", errno.EEXIST),
    ("denied", errno.EACCES),
)


def file_error(text: str, op: str, path: str) -> SandboxFileError:
    """The :class:`SandboxFileError` for a failure a remote sandbox described in words."""
    num = next((n for s, n in _ERRNO if s in text.lower()), errno.EIO)
    what = {
        errno.ENOENT: "no such file or directory",
        errno.ENOTEMPTY: "directory not empty (pass recursive=True)",
        errno.ENOTDIR: "not a directory",
        errno.EISDIR: "is a directory",
    }.get(num, text.strip())
    return SandboxFileError(num, f"{op} {path}: {what}")


_T = TypeVar("_T")


def wait_stoppable(
    call: Callable[[], _T], *, timeout: float | None, cancel: _proc.Cancel | None, kill: Callable[[], None]
) -> tuple[_T | None, bool]:
    """``call()`` on a thread of its own, waited for until it returns, ``timeout`` passes or
    ``cancel`` is set. Returns its result and False; or, when the wait ended first, runs
    ``kill`` (which must make the call return), waits for the call and returns None and True.
    The call's own exception is raised here."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def go() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # raised below, in the caller's thread
            box["exc"] = exc
        finally:
            done.set()

    if cancel is not None:
        cancel.link(done)
    worker = threading.Thread(target=go, daemon=True, name="sandbox-exec")
    worker.start()
    done.wait(timeout)
    if "value" not in box and "exc" not in box:
        kill()
        worker.join(30)
        return None, True
    if "exc" in box:
        raise box["exc"]
    return box["value"], False


_S = TypeVar("_S", bound="SandboxBase")


class SandboxBase(Sandbox):
    """The shared part of every backend's :class:`~pytest_sandbox.types.Sandbox`: ``with``
    support, the closed check, and ``exec`` turning its command into an argv for the backend's
    ``_run``. It implements the protocol (it is not a second contract)."""

    id: str
    _closed: bool

    @property
    def running_services(self) -> list[Service]:
        """The services started in this sandbox, in order (its snapshot's, then a build step's)."""
        found: list[Service] = self.__dict__.setdefault("_running_services", [])
        return found

    @running_services.setter
    def running_services(self, value: list[Service]) -> None:
        self.__dict__["_running_services"] = value

    def __enter__(self: _S) -> _S:
        return self

    def _start_services(self) -> None:
        """Start the snapshot's services in recipe order, each ready before the next starts."""
        self.running_services = []
        for svc in self.snapshot_of.services:
            _services.start(self, svc, self.snapshot_of.short)
            self.running_services.append(svc)

    def _stop_services(self) -> list[Service]:
        """Stop every running service cleanly (last first); returns them, for a restart."""
        running, self.running_services = list(self.running_services), []
        _services.stop_all(self, running)
        return running

    @property
    def services(self) -> dict[str, ServiceStatus]:
        """Each service of this sandbox: ``ready``, ``not ready`` or ``stopped``, and its log."""
        self._check_open()
        known = list(self.snapshot_of.services)
        known += [s for s in self.running_services if s not in known]
        return _services.status(self, known)

    def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """A ``(host, port)`` on this machine's loopback that reaches ``port`` on the sandbox's
        loopback (TCP), open until the sandbox closes."""
        raise EngineUnavailableError(f"the {type(self).__name__} cannot expose ports")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed; create a new one")

    def _run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        on_line: LogCallback | None = None,
        max_output: int | None = None,
        cancel: _proc.Cancel | None = None,
    ) -> ExecResult:
        """Run ``argv``; on ``timeout``, or when ``cancel`` is set, kill its whole process tree."""
        raise NotImplementedError

    async def _arun(
        self,
        argv: Sequence[str],
        *,
        executor: Executor | None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """``_run`` for the async API, on a thread of ``executor``: a cancelled caller gets its
        ``CancelledError`` once the command's process tree is dead."""

        def run(cancel: _proc.Cancel) -> ExecResult:
            return self._run(argv, cwd=cwd, env=env, input=input, timeout=timeout, max_output=max_output, cancel=cancel)

        return await stoppable(executor, run)

    def exec(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command in the sandbox and wait for it.

        A string runs through ``/bin/sh -c``; a list is an argv. Processes it leaves in the
        background keep running for later commands. On ``timeout`` every process the command
        started is killed and :class:`ExecTimeoutError` is raised with the output so far.
        At most ``max_output`` bytes (default 16 MiB) of stdout, and of stderr, are kept: the
        first and last halves, with a marker between them, and ``truncated`` set.
        """
        argv, cwd = exec_argv(command), exec_cwd(cwd)
        return self._run(argv, cwd=cwd, env=exec_env(env), input=input, timeout=timeout, max_output=max_output)


def check_port(port: object, protocol: object = "tcp") -> None:
    """A TCP port number and a protocol (``tcp`` or ``http``) for expose(), or a ConfigError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"expose() takes a TCP port number (1-65535), got {port!r}")
    if protocol not in ("tcp", "http"):
        raise ConfigError(f"expose() takes protocol='tcp' (any protocol over TCP) or 'http', got {protocol!r}")


def refuse_services(image: Image, backend: str) -> None:
    """Services in snapshots run on the local engine only, so far: say so before building."""
    names = [s.args[0] for s in image.steps if s.kind == "service"]
    if names:
        raise EngineUnavailableError(
            f"the {backend} backend does not run recipe services yet ({', '.join(names)}): use the local "
            "engine (--sandbox-backend=local), or start the server in the test with sandbox.exec()"
        )


_cache_said: set[str] = set()
_cache_down: dict[str, float] = {}
CACHE_RETRY = 300.0
"""Seconds a registry that failed is left alone before builds ask it again."""


def cache_fetcher(
    repository: str, pull: Callable[[str], Snapshot], log: LogCallback
) -> Callable[[str], Snapshot | None]:
    """``build(cache_from=repository)``'s lookup for one recipe: a key the registry has is pulled
    with ``pull``. A registry that cannot be used (unreachable, refusing, a pull that fails)
    makes the build go on from what there is; the reason is said once per process, and the
    registry is not asked again for :data:`CACHE_RETRY` seconds."""
    from ..oci import Reference, RegistryClient  # the registry client only for cache users

    try:
        ref = Reference.parse(repository)
    except ConfigError as exc:
        raise ConfigError(f"--sandbox-cache-from / cache_from: {exc}") from None
    repo = f"{ref.registry}/{ref.repository}"
    client = RegistryClient(ca_file=host_ca_bundle())

    def give_up(message: str) -> None:
        _cache_down[repo] = time.monotonic()
        if message not in _cache_said:
            _cache_said.add(message)
            log(message)

    def fetch(key: str) -> Snapshot | None:
        if time.monotonic() - _cache_down.get(repo, -CACHE_RETRY) < CACHE_RETRY:
            return None
        try:
            if not client.has_manifest(ref, key):
                return None
        except SandboxError as exc:
            give_up(f"cache-from {repo} cannot be used ({exc}); building instead")
            return None
        try:
            return pull(f"{repo}:{key}")
        except SandboxError as exc:
            give_up(f"cache-from {repo}: pulling {key[:12]} failed ({exc}); building it instead")
            return None

    return fetch


_B = TypeVar("_B", bound="BackendBase")


class BackendBase:
    """What every backend shares around the protocol: ``with`` support and the closed check."""

    _closed: bool

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def _check_backend_open(self) -> None:
        if self._closed:
            raise SandboxClosedError("this backend was closed; open a new one with open_backend()")

    name: str

    def push(self, snapshot: Snapshot | str, repository: str, *, on_log: LogCallback | None = None) -> str:
        """Push a snapshot to a registry (see the README for which backends can)."""
        raise EngineUnavailableError(
            f"the {self.name} backend cannot push snapshots to a registry: push from the local engine "
            "(or docker), whose images every backend can start from"
        )

    def pull(self, reference: str, *, on_log: LogCallback | None = None) -> Snapshot:
        """Pull a pushed snapshot (see the README for which backends can)."""
        raise EngineUnavailableError(f"the {self.name} backend cannot pull snapshots from a registry")


class RemoteBackend(BackendBase):
    """The session bookkeeping of backends whose sandboxes live elsewhere (docker, daytona): the
    labels that tie each sandbox to this session, a watchdog that removes them if we die, ``gc``
    of dead sessions' leftovers at start, and ``close`` of what this session made."""

    OWNER_LABEL = "session"
    store: Store

    def _start_session(self, watchdog_script: str) -> None:
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._live: set[Sandbox] = set()
        self._watchdog = Watchdog(watchdog_script, self.store.owner)
        self._closed = False
        self.gc(wait=False)  # leftovers of sessions that died are removed at the next start
        atexit.register(self.close)

    def gc(self, *, wait: bool = True) -> int:
        raise NotImplementedError

    def snapshots(self) -> Iterator[Snapshot]:
        raise NotImplementedError

    def remove_snapshot(self, snapshot: Snapshot | str) -> None:
        raise NotImplementedError

    def labels(self, **extra: str) -> dict[str, str]:
        """Labels everything this process makes carries (gc and the watchdog find it by them)."""
        return {
            LABEL: "1",
            f"{LABEL}.{self.OWNER_LABEL}": self.store.owner,
            f"{LABEL}.host": self.host,
            f"{LABEL}.store": str(self.store.root),
            **extra,
        }

    def prune(self, older_than: float = 0.0) -> list[str]:
        """Delete snapshots created more than ``older_than`` seconds ago; returns their keys."""
        now = time.time()
        doomed = [s.key for s in self.snapshots() if now - s.created >= older_than]
        for key in doomed:
            self.remove_snapshot(key)
        return doomed

    def _release(self) -> None:
        """What a backend drops at close beyond its sandboxes (e.g. ephemeral snapshots)."""

    def close(self) -> None:
        """Close every sandbox this backend made; the watchdog has nothing left to do."""
        if self._closed:
            return
        self._closed = True
        for sb in list(self._live):
            sb.close()
        self._release()
        self._watchdog.fire()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
