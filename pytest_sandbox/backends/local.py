"""The embedded local engine: overlayfs layer stacks + bubblewrap namespaces, rootless, no daemon.

A sandbox is one ``bwrap`` process tree: a pid-1 init holding a set of namespaces (user, mount,
pid, ipc, uts, net) whose root is an overlay of the snapshot's immutable layers under a private
writable layer. ``exec`` enters those namespaces with ``nsenter``, so processes and files persist
between commands. ``snapshot()`` copies the writable layer out as a new immutable layer: it costs
what changed, never the image size.

Every sandbox runs inside a user namespace the backend creates once. As an unprivileged user it
maps only the caller (seen as root inside); as root it maps ids 0..65535 onto an unprivileged host
range (``engine/ids.py``), so package managers chown as usual and root inside is nobody outside.
Commands enter through a helper under the sandbox's seccomp filter and, where cgroups can be
used, already inside the sandbox's cgroup (its limits); see ``engine/``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import os
import resource
import shlex
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .. import _proc
from .._build import build_env, build_recipe, loopback_proxies, run_step
from ..engine.bases import Bases
from ..engine.cgroups import Cgroup
from ..engine.expose import Exposure
from ..engine.host import DEFAULT_ENV, HOST_ENV, Host, UserNamespace
from ..engine.ids import IdMap
from ..engine.pool import WarmPool
from ..engine.safefs import SafeFS
from ..engine.sandbox import Engine, EngineSandbox
from ..engine.share import Shares
from ..errors import (
    ConfigError,
    SandboxClosedError,
    SandboxError,
    ServiceError,
    SnapshotBuildError,
    say_once,
)
from ..image import Image, Step, env_items
from ..store import Store, disk_usage, format_size, new_id
from ..types import (
    DEFAULT_LIMITS,
    ExecResult,
    Limits,
    LimitStatus,
    LogCallback,
    Network,
    Snapshot,
    Usage,
    format_bytes,
)
from ._base import (
    LOGIN_SHELL,
    BackendBase,
    SandboxBase,
    cache_fetcher,
    check_port,
    exec_result,
    resolve_snapshot,
)

__all__ = ["LocalBackend", "LocalSandbox"]


class LocalBackend(BackendBase):
    """The embedded engine. ``open_backend("local")`` returns one; close it when done (``with``).

    ``cache_dir`` defaults to ``$PYTEST_SANDBOX_CACHE`` or the XDG cache directory. ``max_memory``
    (bytes, or a size like ``"8G"``) caps the memory of all sandboxes of ``run`` together: every
    backend opened with the same ``run`` (the plugin gives its xdist workers one) shares it.
    """

    name = "local"

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        limits: Limits | None = None,
        max_memory: int | str | None = None,
        run: str = "",
    ) -> None:
        self.limits = (limits or Limits()).over(DEFAULT_LIMITS)
        self.store = Store(cache_dir)
        total = Limits(memory=max_memory).memory_bytes
        if run and not run.isalnum():
            raise ConfigError(f"run takes letters and digits (it names a cgroup), got {run!r}")
        self.host = Host(self.store, run=run, max_memory=total)
        if total is not None and self.host.cgroups.cap_reason:
            why = self.host.cgroups.cap_reason
            say_once(f"max_memory={format_bytes(total)} for all sandboxes together is NOT held: {why}")
        self.ids: IdMap | None = self.host.ids
        self.rootless = self.ids is None
        self._bases = Bases(self.store, self.ids, self.name)
        self._shares = Shares(self.store, self.ids, self._bases.registry, self.name)
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[LocalSandbox] = weakref.WeakSet()
        self._ephemeral: list[str] = []
        self._closed = False
        self.engine = Engine(self.store, self.host, self.limits)
        # A snapshot whose services failed fails every later create() at once, not after a wait.
        self._service_failures: dict[str, ServiceError] = {}
        self._pool: WarmPool[LocalSandbox] = WarmPool(
            lambda snap: LocalSandbox(self, snap, network=None, env={}, limits=self.limits)
        )
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # one pipe per live sandbox: the default 1024 is too few for big suites
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"<LocalBackend cache={self.store.cache_dir} rootless={self.rootless}>"

    @property
    def userns(self) -> UserNamespace:
        """The user namespace every sandbox of this backend lives in."""
        return self.host.userns

    def launch_path(self, path: Path) -> str:
        """``path`` (in the store) as bwrap sees it when it starts a sandbox."""
        return self.host.launch_path(path)

    def bwrap_launcher(self) -> list[str]:
        """The command line that starts bwrap the way every sandbox is started."""
        return self.host.bwrap_launcher()

    def usage(self, snapshot: Snapshot) -> Usage:
        """The size of ``snapshot``'s own layer and when a sandbox last started from it."""
        size = disk_usage(self.store.layer_path(snapshot.layers[-1])) if snapshot.layers else None
        return Usage(size=size, last_used=self.store.last_used(snapshot))

    def location(self) -> str:
        """The cache directory, and how much its layers take."""
        return f"{format_size(disk_usage(self.store.root / 'l'))} of layers in {self.store.cache_dir}"

    # -- snapshots ---------------------------------------------------------------------------
    def get_snapshot(self, key_or_name: str) -> Snapshot:
        """A stored snapshot by key, unique key prefix or name."""
        return self.store.find(key_or_name)

    def snapshots(self) -> Iterator[Snapshot]:
        """Every stored snapshot, oldest first."""
        return iter(self.store.all())

    def remove_snapshot(self, snapshot: Snapshot | str) -> None:
        """Delete a snapshot and the layers nothing else uses. Live sandboxes keep working."""
        key = snapshot.key if isinstance(snapshot, Snapshot) else self.store.find(snapshot).key
        self.store.remove([key])

    def gc(self, *, wait: bool = True) -> int:
        """Remove sandboxes, temporary trees and ephemeral snapshots of processes that died
        (``wait=False``: skip the store's part if another process holds it, see :meth:`Store.gc`)."""
        removed = self.store.gc(aliases=lambda d: [self.launch_path(d)], wait=wait)
        return removed + self.host.cgroups.gc(self.store.owner_alive)

    def verify(self) -> dict[str, list[str]]:
        """Check every layer in full (entries and bytes against what was published).

        A damaged layer is marked absent, so the next build of a recipe that used it builds
        that step again. Returns each damaged layer with the keys of the snapshots it broke.
        """
        with self.store.shared():
            snaps = self.store.all()
            damaged = [layer for layer in self.store.layers() if not self.store.layer_ok(layer, full=True)]
            for layer in damaged:
                self.store.forget_layer(layer)
        return {layer: [s.key for s in snaps if layer in s.layers] for layer in damaged}

    def prune(self, older_than: float = 0.0) -> list[str]:
        """Delete snapshots unused for ``older_than`` seconds; returns their keys."""
        return self.store.prune(older_than)

    # -- building ----------------------------------------------------------------------------
    def build(
        self,
        image: Image,
        *,
        on_log: LogCallback | None = None,
        rebuild: bool | float = False,
        cache_from: str | None = None,
    ) -> Snapshot:
        """Build ``image`` once per setup key and return its snapshot; later calls reuse it.

        ``rebuild=True`` ignores cached snapshots of this recipe's steps; a timestamp ignores only
        those created before it (so parallel workers of one run still build once). The base
        (a Debian rootfs, an unpacked tarball) is kept: ``pytest-sandbox rm`` it to refresh it.
        ``cache_from`` names a registry repository of pushed snapshots to pull from first.
        """
        log = on_log or (lambda _line: None)
        image = self._bases.pin(image, log)
        fetch = cache_fetcher(cache_from, lambda ref: self.pull(ref, on_log=log), log) if cache_from else None
        snap = build_recipe(
            image,
            get=self.store.get,
            lock=self.store.build_lock,
            build_base=self._bases.build,
            build_step=self._build_step,
            on_log=on_log,
            rebuild=rebuild,
            fetch=fetch,
        )
        self.store.touch(snap)
        return snap

    # -- sharing -----------------------------------------------------------------------------
    def push(self, snapshot: Snapshot | str, repository: str, *, on_log: LogCallback | None = None) -> str:
        """Push ``snapshot`` and its parents to ``repository`` as OCI images tagged by key;
        layers the registry has are not sent again. Returns ``REPOSITORY:KEY``."""
        snap = snapshot if isinstance(snapshot, Snapshot) else self.store.find(snapshot)
        return self._shares.push(snap, repository, on_log or (lambda _line: None))[-1]

    def pull(self, reference: str, *, on_log: LogCallback | None = None) -> Snapshot:
        """Pull ``REPOSITORY:KEY`` (or ``REPOSITORY@sha256:...``, pinned) into the cache under
        its key; layers already here are not downloaded again."""
        return self._shares.pull(reference, on_log or (lambda _line: None))

    def export(
        self, snapshot: Snapshot | str, dest: str | os.PathLike[str], *, on_log: LogCallback | None = None
    ) -> Path:
        """Write ``snapshot`` and its parents to ``dest`` as an OCI image layout archive
        (``docker load``, ``skopeo copy oci-archive:`` and :meth:`import_archive` read it)."""
        snap = snapshot if isinstance(snapshot, Snapshot) else self.store.find(snapshot)
        return self._shares.export(snap, Path(dest), on_log or (lambda _line: None))

    def import_archive(self, path: str | os.PathLike[str], *, on_log: LogCallback | None = None) -> list[Snapshot]:
        """Every snapshot of an archive written by :meth:`export`, into the cache under its key."""
        return self._shares.import_archive(Path(path), on_log or (lambda _line: None))

    def _build_step(self, parent: Snapshot, step: Step, key: str, i: int, n: int, log: LogCallback) -> Snapshot:
        env = dict(parent.env)
        workdir = parent.workdir
        if step.kind == "env":
            images = None if parent.process is None else self.store.process_path(parent).name
            snap = Snapshot(
                key=key,
                backend=self.name,
                layers=parent.layers,
                base=parent.base,
                env=tuple({**env, **dict(step.env)}.items()),
                workdir=workdir,
                parent=parent.key,
                description=step.describe(),
                services=parent.services,
                # the same processes: their images stay where the live parent's are
                process=None if parent.process is None else {**parent.process, "images": images},
            )
            with self.store.shared():
                self.store.put(snap)
            return snap
        # A network of its own (the default policy: the internet, not the host), never the host's;
        # a proxy on the host's loopback is reached through a forwarder to its one port.
        env, proxies = loopback_proxies(build_env())
        uplinks = self.host.uplinks
        # A live service is frozen running, and what follows it goes on from that live snapshot:
        # those steps are taken live too, and without network (a live sandbox has none yet).
        live = parent.live or (step.kind == "service" and step.service().live)
        if live:
            self.engine.criu.require()
        networked = uplinks.usable and not live
        sb = LocalSandbox(
            self,
            parent,
            network=Network() if networked else None,
            env={},
            limits=self.limits,
            proxies={} if live else proxies,
        )
        with self._lock:
            self._live.add(sb)
        try:
            try:
                workdir = run_step(sb, step, key=key, index=i, count=n, workdir=parent.workdir, env=env, log=log)
            except SnapshotBuildError as exc:
                if networked or exc.exit_code is None:
                    raise
                why = (
                    "build steps after a live service have no network (put the steps that download before it)"
                    if live
                    else f"build steps have no network here: {uplinks.reason}"
                )
                raise SnapshotBuildError(
                    key=exc.key,
                    step_index=exc.step_index,
                    step_count=exc.step_count,
                    step=exc.step,
                    exit_code=exc.exit_code,
                    output=exc.output,
                    reason=why,
                ) from exc
            return sb._freeze(key=key, workdir=workdir, description=step.describe(), live=live)
        finally:
            sb.close()

    # -- sandboxes ---------------------------------------------------------------------------
    def create(
        self,
        snapshot: Snapshot | Image | str,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> LocalSandbox:
        """Fork a fresh copy-on-write sandbox from a snapshot (an Image is built first).

        ``network=False`` (the default) leaves only loopback; ``True`` (or a
        :class:`~pytest_sandbox.Network` policy, or a list of destinations to allow) gives it a
        network of its own to the outside, never the host's; ``env`` adds environment variables
        for every command in the sandbox; ``limits`` override the backend's (see ``sb.limits``).
        """
        policy = Network.of(network)
        self._check_backend_open()
        snapshot = resolve_snapshot(self, snapshot)
        failed = self._service_failures.get(snapshot.key)
        if failed is not None:
            raise ServiceError(failed.name, failed.snapshot, failed.reason + " (as before)", failed.log)
        wanted = self.limits if limits is None else limits.over(self.limits)
        # Spares run with the backend's limits, and their services started with the snapshot's
        # environment: other limits, or extra env for services, get a sandbox of their own.
        pooled = policy is None and wanted == self.limits and not (env and snapshot.services)
        sb = self._pool.take(snapshot) if pooled else None
        if sb is None:
            sb = LocalSandbox(self, snapshot, network=policy, env=dict(env_items(env or {})), limits=wanted)
        else:
            sb._set_env(dict(env_items(env or {})))
        with self._lock:
            self._live.add(sb)
        return sb

    def close(self) -> None:
        """Close every sandbox this backend created and drop its ephemeral snapshots."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        for sb in list(self._live):
            sb.close()
        self.engine.close()
        if self._ephemeral:
            with contextlib.suppress(Exception):
                self.store.remove(self._ephemeral)
        self.store.flush()
        self.host.cgroups.release(self.store.owner)
        self.host.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


def _why(exc: OSError) -> str:
    """What a command that could not be started should do about it."""
    if exc.errno == errno.E2BIG or "too long" in str(exc):
        return "its arguments and environment are more than the kernel takes (about 2 MiB); pass data with input="
    if exc.errno in (errno.EAGAIN, errno.EMFILE, errno.ENFILE) or "limit" in str(exc):
        return f"{exc}; the sandbox (or this user) is out of processes or files: close some, or raise Limits(pids=)"
    return f"{exc}; create a new sandbox"


class LocalSandbox(SandboxBase):
    """A running sandbox of the local engine. Use it as a context manager, or call :meth:`close`.

    The engine's sandbox (:class:`~pytest_sandbox.engine.sandbox.EngineSandbox`) owns its life;
    this adds what the :class:`~pytest_sandbox.types.Sandbox` contract asks: commands and their
    output, files, exposed ports, services, snapshots and forks."""

    def __init__(
        self,
        backend: LocalBackend,
        snapshot: Snapshot,
        *,
        network: Network | None,
        env: dict[str, str],
        limits: Limits,
        proxies: Mapping[int, tuple[str, int]] | None = None,
    ) -> None:
        self.backend = backend
        self._limits = limits
        self.snapshot_of = snapshot
        self.network = network
        self.history: list[ExecResult] = []
        self._extra_env = env
        self._env = {**DEFAULT_ENV, **dict(snapshot.env), **env}
        self._lock = threading.Lock()
        self._running: set[_proc.Cancel] = set()
        self._fs: SafeFS | None = None
        self._exposed: dict[int, Exposure] = {}
        self._sb = EngineSandbox(backend.engine, snapshot, network=network, limits=limits, proxies=proxies)
        self.id = self._sb.id
        backend.store.touch(snapshot)
        try:
            if snapshot.live:  # its services were frozen running, and run on
                self.running_services = list(snapshot.services)
            else:
                self._start_services()
        except ServiceError as exc:
            backend._service_failures.setdefault(snapshot.key, exc)
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def _set_env(self, env: dict[str, str]) -> None:
        self._extra_env = env
        self._env = {**DEFAULT_ENV, **dict(self.snapshot_of.env), **env}

    # -- the engine's sandbox ------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The host pid of its init."""
        return self._sb.pid

    @property
    def _cgroup(self) -> Cgroup | None:
        return self._sb.cgroup

    @property
    def limits(self) -> dict[str, LimitStatus]:
        """Each limit of this sandbox and how it is held here (or why it is not)."""
        return dict(self._sb.status)

    def __repr__(self) -> str:
        state = "closed" if self._sb.closed else f"pid {self.pid}"
        return f"<LocalSandbox {self.id} of {self.snapshot_of.short} {state}>"

    def alive(self) -> bool:
        """True while the sandbox is open and its init runs (what the warm pool checks)."""
        return self._sb.alive()

    @property
    def closed(self) -> bool:
        return self._sb.closed

    @property  # read by the shared parts of every backend's sandbox
    def _closed(self) -> bool:  # type: ignore[override]
        return self._sb.closed

    def _check_open(self) -> None:
        self._sb.check_open()

    # -- commands ----------------------------------------------------------------------------
    def nsenter_argv(
        self, argv: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> tuple[list[str], bytes, int]:
        """The host command line that runs ``argv`` inside this sandbox, in ``cwd``, with this
        sandbox's environment and ``env`` over it, and the environment's file (see
        :meth:`Host.enter_argv`)."""
        return self._sb.enter_argv(argv, cwd, {**self._env, **(env or {})})

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
        self._check_open()
        if isinstance(input, str):
            input = input.encode()
        ooms = self._cgroup.oom_kills() if self._cgroup is not None else 0
        # close() stops every running command: a host-side nsenter whose child stopped itself
        # (kill -STOP $$) never reaps it, and the pid namespace cannot die until someone does.
        own = cancel is None
        stop = _proc.Cancel() if cancel is None else cancel
        with self._lock:
            self._running.add(stop)
        try:
            self._check_open()  # a close() between the first check and the registration
            limit = _proc.DEFAULT_MAX_OUTPUT if max_output is None else max_output
            run = functools.partial(
                _proc.run, input=input, timeout=timeout, on_line=on_line, max_output=limit, cancel=stop
            )
            inside = self._sb.inside()
            if inside is not None:  # one message to the sandbox's own helper, one spawn there
                try:
                    res = run(list(argv), env={**self._env, **(env or {})}, cwd=cwd, spawner=inside)
                except (BrokenPipeError, ConnectionResetError):  # it is gone, and never took the command
                    self._sb.lost_inside(inside)
                    inside = None
            if inside is None:
                line, script, slot = self.nsenter_argv(argv, cwd, env)
                # Through the sandbox's host-side helper: filtered like its init, and in its cgroup.
                res = run(line, env=HOST_ENV, fd_data=(script, slot), spawner=self._sb.spawner())
        except OSError as exc:  # not started at all: argv too long, no process or fd to be had
            raise SandboxError(f"could not start {argv[0]!r} in sandbox {self.id}: {_why(exc)}") from exc
        finally:
            with self._lock:
                self._running.discard(stop)
            if own:
                stop.close()
        if stop.is_set() and self._closed:
            raise SandboxClosedError(
                f"sandbox {self.id} was closed while `{shlex.join(argv)}` ran; its processes were killed"
            )
        oom = res.returncode == 137 and self._cgroup is not None and self._cgroup.oom_kills() > ooms
        return exec_result(
            self.history,
            argv,
            exit_code=res.returncode,
            stdout=res.stdout,
            stderr=res.stderr,
            duration=res.duration,
            timed_out=res.timed_out,
            timeout=timeout,
            truncated=res.truncated,
            max_output=max_output,
            oom_killed=oom,
        )

    def interactive(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` in the sandbox on this process's stdin, stdout and stderr (a terminal, for
        ``pytest-sandbox shell``) and return its exit code. Filtered like every exec; it runs in a
        session of its own, so it cannot push input into the caller's terminal (no job control)."""
        self._check_open()
        line, script, slot = self.nsenter_argv(argv or LOGIN_SHELL, env=env)
        data = _proc.memfd("env", script)
        try:
            child = self._sb.spawner().spawn(_proc.Start(line, dict(HOST_ENV), (0, 1, 2), (data, slot)))
        finally:
            os.close(data)
        code = child.wait()
        return 128 - code if code < 0 else code

    def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """A ``(host, port)`` on this machine's loopback that reaches ``port`` on the sandbox's
        loopback (TCP: a database, an HTTP server), open until the sandbox closes."""
        self._check_open()
        check_port(port, protocol)
        with self._lock:
            exp = self._exposed.get(port)
        if exp is None:
            engine, pid = self.backend.engine, self.pid
            maker = engine.socket_maker()
            exp = engine.forwarder.open(port, lambda: maker.socket_in(pid))
            with self._lock:
                self._exposed[port] = exp
        return exp.address

    @property
    def fs(self) -> SafeFS:
        """Files inside the sandbox (read, write, upload, download, listdir, exists, remove)."""
        if self._fs is None:
            self._fs = SafeFS(self._sb.root_fd, owner=None if self.backend.ids is None else self.backend.ids.root)
        return self._fs

    # -- snapshots ---------------------------------------------------------------------------
    def _freeze(
        self,
        *,
        key: str | None = None,
        name: str | None = None,
        workdir: str | None = None,
        description: str = "",
        ephemeral: bool = False,
        live: bool = False,
    ) -> Snapshot:
        self._check_open()
        b, store, parent = self.backend, self.backend.store, self.snapshot_of
        services = tuple(parent.services) + tuple(s for s in self.running_services if s not in parent.services)

        def record(layers: tuple[str, ...], process: dict[str, object] | None = None) -> Snapshot:
            return Snapshot(
                key=key or "x" + new_id(8),
                backend=b.name,
                layers=layers,
                base=parent.base,
                env=parent.env,
                workdir=workdir or parent.workdir,
                parent=parent.key,
                description=description or f"{'live ' if live else ''}snapshot of sandbox {self.id}",
                name=name,
                owner=store.owner if ephemeral else None,
                services=services,
                process=process,
            )

        if live:  # its services are frozen running, with everything else
            snap = self._sb.checkpoint(record)
        else:
            # Stopped cleanly first: the copy holds a shut-down service, so forks never pay recovery.
            self._stop_services()
            snap = self._sb.freeze(record)
        if ephemeral:
            b._ephemeral.append(snap.key)
        return snap

    def snapshot(self, name: str | None = None, *, live: bool = False) -> Snapshot:
        """Freeze this sandbox's current files into a new snapshot; the sandbox keeps running.

        Costs what changed since the sandbox started, not the image size. Services are stopped
        cleanly for the copy and started again here, and every sandbox created from the snapshot
        starts them. ``live=True`` (as root, with CRIU 4.2 or newer) freezes its processes too,
        memory included, at the same instant as its files: every sandbox created from it
        continues them (see the README's "Live snapshots").
        """
        if live:
            return self._freeze(name=name, live=True)
        try:
            return self._freeze(name=name)
        finally:
            self._start_services()

    def fork(self, *, live: bool = False) -> LocalSandbox:
        """A new sandbox from this one's current state (an ephemeral snapshot, removed when the
        backend closes). Branches see the state, not each other's later writes. ``live=True``
        keeps its processes running in the branch (see :meth:`snapshot`)."""
        description = f"{'live ' if live else ''}fork of sandbox {self.id}"
        if live:
            snap = self._freeze(ephemeral=True, description=description, live=True)
        else:
            try:
                snap = self._freeze(ephemeral=True, description=description)
            finally:
                self._start_services()
        return self.backend.create(snap, network=self.network or False, env=self._extra_env, limits=self._limits)

    def close(self) -> None:
        """Kill every process in the sandbox and delete its writable layer. Idempotent."""
        if self._sb.closed:
            return
        with self._lock:
            running = list(self._running)
        # close() ends running commands: a host-side nsenter whose child stopped itself never
        # reaps it, and the pid namespace cannot die until someone does.
        for stop in running:
            stop.set()
        for exp in self._exposed.values():
            with contextlib.suppress(Exception):
                exp.close()
        # Reaping the init and deleting the writable layer happen in the background: the
        # namespace is already dead, and a test suite should not wait for its teardown.
        self._sb.close()
        with self.backend._lock:
            self.backend._live.discard(self)

    def __del__(self) -> None:
        sb = self.__dict__.get("_sb")
        if sb is not None and not sb.closed:
            with contextlib.suppress(Exception):
                self.close()
