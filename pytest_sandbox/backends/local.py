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
import os
import resource
import shlex
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .. import _proc
from .._build import build_env, build_recipe, loopback_proxies, run_step
from .._lifeline import Reaper
from ..engine.bases import Bases
from ..engine.cgroups import Cgroup
from ..engine.disk import Disk
from ..engine.expose import Exposure, Forwarder, SocketMaker
from ..engine.freeze import freeze
from ..engine.host import DEFAULT_ENV, HOST_ENV, Host, UserNamespace
from ..engine.ids import IdMap
from ..engine.limits import apply_to_running, rlimits_for
from ..engine.net import RESOLV_CONF, Uplink
from ..engine.pool import Spares, WarmPool
from ..engine.safefs import SafeFS
from ..engine.share import Shares
from ..engine.spawn import Confined, Spawner
from ..errors import (
    ConfigError,
    EngineUnavailableError,
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
        self._forwarder = Forwarder()
        self._reaper = Reaper()  # kills every sandbox's init once we are gone, however we go
        self._maker: SocketMaker | None = None
        # A snapshot whose services failed fails every later create() at once, not after a wait.
        self._service_failures: dict[str, ServiceError] = {}
        self._slots: Spares[tuple[Cgroup, Confined]] = Spares(self._new_slot, _drop_slot)
        # Sandbox directories with a disk of the default size already mounted: mounting costs
        # more than the rest of a fork, so a fork (a search tree's node) does not wait for it.
        self._ready_disks: Spares[tuple[str, Path, Disk]] = Spares(self._new_disk_dir, self._drop_disk_dir)
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

    def _new_slot(self) -> tuple[Cgroup, Confined]:
        cg = self.host.cgroups.create(self.store.owner, new_id(6))
        try:
            return cg, self.host.spawner.confined(cg.procs)
        except BaseException:
            cg.remove()
            raise

    def _new_disk_dir(self) -> tuple[str, Path, Disk]:
        sid = new_id(6)
        size = self.limits.disk_bytes
        assert size is not None
        with self.store.shared():
            d = self.store.register_sandbox(sid, {"layers": [], "spare": True})
        try:
            return sid, d, self.host.disks.make(d, size)
        except BaseException:
            self.store.discard(d)
            raise

    def _drop_disk_dir(self, item: tuple[str, Path, Disk]) -> None:
        self.store.discard(item[1], then=item[2].release)

    def take_disk_dir(self, limits: Limits) -> tuple[str, Path, Disk] | None:
        """A spare sandbox directory with its disk mounted, when ``limits`` ask for the default
        disk and disks can be made here; else None (the sandbox makes its own)."""
        disks = self.host.disks
        if limits.disk_bytes != self.limits.disk_bytes or not disks.ext4:
            return None
        try:
            return self._ready_disks.take()
        except SandboxError:
            return None

    def socket_maker(self) -> SocketMaker:
        """The helper that makes sockets inside sandboxes' networks (started on first need)."""
        with self._lock:
            if self._maker is None:
                enter = []
                if self.rootless:  # the sandboxes' user namespace holds the right to enter them
                    enter = [self.host.nsenter, "-t", str(self.userns.pid), "-U", "--preserve-credentials", "--"]
                self._maker = SocketMaker(enter)
            return self._maker

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

    def gc(self) -> int:
        """Remove sandboxes, temporary trees and ephemeral snapshots of processes that died."""
        removed = self.store.gc(aliases=lambda d: [self.launch_path(d)])
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
            )
            with self.store.shared():
                self.store.put(snap)
            return snap
        # A network of its own (the default policy: the internet, not the host), never the host's;
        # a proxy on the host's loopback is reached through a forwarder to its one port.
        env, proxies = loopback_proxies(build_env())
        uplinks = self.host.uplinks
        sb = LocalSandbox(
            self, parent, network=Network() if uplinks.usable else None, env={}, limits=self.limits, proxies=proxies
        )
        with self._lock:
            self._live.add(sb)
        try:
            try:
                workdir = run_step(sb, step, key=key, index=i, count=n, workdir=parent.workdir, env=env, log=log)
            except SnapshotBuildError as exc:
                if uplinks.usable or exc.exit_code is None:
                    raise
                raise SnapshotBuildError(
                    key=exc.key,
                    step_index=exc.step_index,
                    step_count=exc.step_count,
                    step=exc.step,
                    exit_code=exc.exit_code,
                    output=exc.output,
                    reason=f"build steps have no network here: {uplinks.reason}",
                ) from exc
            return sb._freeze(key=key, workdir=workdir, description=step.describe())
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
        self._slots.close()
        self._ready_disks.close()
        for sb in list(self._live):
            sb.close()
        self._forwarder.close()
        self._reaper.close()
        if self._maker is not None:
            self._maker.close()
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


def _drop_slot(slot: tuple[Cgroup, Confined]) -> None:
    slot[1].close()
    slot[0].remove()


class LocalSandbox(SandboxBase):
    """A running sandbox of the local engine. Use it as a context manager, or call :meth:`close`."""

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
        self._cgroup: Cgroup | None = None
        self._status: dict[str, LimitStatus] = {}
        self._prlimit: list[str] = []
        self._helper: Confined | None = None
        self.snapshot_of = snapshot
        self.network = network
        self.id = new_id(6)
        self.history: list[ExecResult] = []
        self._extra_env = env
        self._env = {**DEFAULT_ENV, **dict(snapshot.env), **env}
        self._closed = False
        self._running: set[_proc.Cancel] = set()
        self._fs: SafeFS | None = None
        self._exposed: dict[int, Exposure] = {}
        self._forwarded: list[Exposure] = []  # host ports reached from inside (a build's proxy)
        self._uplink: Uplink | None = None
        self._proxies = dict(proxies or {})
        store = backend.store
        with store.shared():
            if not all(store.layer_path(x).is_dir() for x in snapshot.layers):
                raise SandboxClosedError(
                    f"snapshot {snapshot.short} lost its layers (removed or pruned); build it again"
                )
            meta = {"layers": list(snapshot.layers), "snapshot": snapshot.key}
            # Where the writable layer lives (its disk, once mounted), as the host and as bwrap see it.
            self._disk: Disk | None = None
            spare = backend.take_disk_dir(limits)
            if spare is not None:
                self.id, self._dir, self._disk = spare
                store.set_sandbox_meta(self._dir, meta)
                self._scratch, self._scratch_launch = self._disk.path, self._disk.launch
            else:
                self._dir = store.register_sandbox(self.id, meta)
                self._scratch, self._scratch_launch = self._dir, backend.launch_path(self._dir)
        try:
            self._confine()
            self._start()
        except BaseException:
            store.discard(self._dir, then=self._release)
            raise
        store.touch(snapshot)
        try:
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

    def _confine(self) -> None:
        """The sandbox's cgroup, disk and limits (or, without cgroups, the rlimits that stand in)."""
        host = self.backend.host
        if host.cgroups.usable:
            # A cgroup made ahead of need, its helper already inside: only the limits are set here.
            self._cgroup, self._helper = self.backend._slots.take()
            self._status = self._cgroup.apply(self._limits)
            v = host.cgroups.version
            why = f"its cgroup v{v} controller is not {'enabled for our cgroups' if v == 2 else 'mounted'}"
        else:
            why = host.cgroups.reason
            self._prlimit, self._status = rlimits_for(self._limits, host.prlimit)
        size = self._limits.disk_bytes
        if self._disk is not None:
            self._status["disk"] = LimitStatus("disk", self._disk.size, True, self._disk.how)
        elif size is not None:
            self._status["disk"] = self._make_disk(size)
        for name, value in self._limits.items():
            if name not in self._status:
                self._status[name] = LimitStatus(name, value, False, why)
        unenforced = [s for s in self._status.values() if not s.enforced]
        if unenforced:
            say_once("; ".join(str(s) for s in unenforced))

    @property
    def _networked(self) -> bool:
        """Whether anything of the outside reaches into the sandbox's network namespace (an
        uplink, a forwarded proxy port): its commands then have no raw sockets or routes."""
        return self.network is not None or bool(self._proxies)

    def _make_disk(self, size: int) -> LimitStatus:
        try:
            self._disk = self.backend.host.disks.make(self._dir, size)
        except SandboxError as exc:
            return LimitStatus("disk", size, False, str(exc))
        self._scratch, self._scratch_launch = self._disk.path, self._disk.launch
        return LimitStatus("disk", size, True, self._disk.how)

    def _release(self) -> None:
        """What the sandbox holds outside its directory: its uplink, helper, cgroup and disk."""
        if self._uplink is not None:
            self._uplink.wait()
        if self._helper is not None:
            self._helper.close()
        if self._cgroup is not None:
            self._cgroup.remove()
        if self._disk is not None:
            self._disk.release()

    @property
    def limits(self) -> dict[str, LimitStatus]:
        """Each limit of this sandbox and how it is held here (or why it is not)."""
        return dict(self._status)

    def _spawner(self) -> Spawner | Confined:
        return self._helper or self.backend.host.spawner

    def _start(self) -> None:
        b = self.backend
        uplinks = b.host.uplinks
        if self.network is not None and not uplinks.usable:
            raise EngineUnavailableError(
                f"network=True gives a sandbox a network of its own, never the host's, and here {uplinks.reason}; "
                "or create it without network"
            )
        argv = b.bwrap_launcher()
        argv += b.host.mount_args(self.snapshot_of, self._scratch, self._scratch_launch)
        resolv = _proc.memfd("resolv.conf", RESOLV_CONF) if self.network is not None else -1
        seccomp = _proc.memfd("seccomp", b.host.seccomp)
        try:
            argv += b.host.sandbox_args(self.snapshot_of, network=self._networked, resolv=resolv)
            argv += ["--seccomp", str(seccomp)]
            self._proc, self.pid = b.host.launch(argv, [seccomp, *([resolv] if resolv >= 0 else [])])
        finally:
            for fd in (seccomp, resolv):
                if fd >= 0:
                    os.close(fd)
        try:
            # bwrap started the init and the holder outside the sandbox's limits
            apply_to_running(self.pid, self._limits, self._cgroup, rlimits=bool(self._prlimit))
            b._reaper.watch(self.pid)
            if self.network is not None:
                self._uplink = uplinks.connect(self.pid, self.network, alive=lambda: self._proc.poll() is None)
                if self._cgroup is not None:  # what the sandbox makes it hold counts as the sandbox's
                    self._cgroup.adopt([self._uplink.proc.pid])
            for port, target in self._proxies.items():  # a build step's proxy on the host's loopback
                self._forwarded.append(b._forwarder.open_inward(b.socket_maker(), self.pid, port, target))
        except BaseException:  # the sandbox goes (its uplink with it, in _release)
            with contextlib.suppress(OSError):
                os.kill(self.pid, 9)
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            self._proc.wait()
            raise

    # -- context -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid {self.pid}"
        return f"<LocalSandbox {self.id} of {self.snapshot_of.short} {state}>"

    def alive(self) -> bool:
        """True while the sandbox is open and its init runs (what the warm pool checks)."""
        return not self._closed and self._proc.poll() is None

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed; create a new one")
        if self._proc.poll() is not None:
            raise SandboxClosedError(f"sandbox {self.id} died (its init exited); create a new one")

    # -- commands ----------------------------------------------------------------------------
    def nsenter_argv(
        self, argv: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> tuple[list[str], bytes, int]:
        """The host command line that runs ``argv`` inside this sandbox, in ``cwd``, with this
        sandbox's environment and ``env`` over it, and the environment's file (see
        :meth:`Host.enter_argv`)."""
        env = {**self._env, **(env or {})}
        return self.backend.host.enter_argv(
            self.pid, argv, cwd=cwd, env=env, via=self._prlimit, networked=self._networked
        )

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
        with self.backend._lock:
            self._running.add(stop)
        try:
            self._check_open()  # a close() between the first check and the registration
            line, script, slot = self.nsenter_argv(argv, cwd, env)
            res = _proc.run(
                line,
                env=HOST_ENV,
                fd_data=(script, slot),
                input=input,
                timeout=timeout,
                on_line=on_line,
                max_output=_proc.DEFAULT_MAX_OUTPUT if max_output is None else max_output,
                spawner=self._spawner(),  # filtered like the sandbox's init, and in its cgroup
                cancel=stop,
            )
        except OSError as exc:  # not started at all: argv too long, no process or fd to be had
            raise SandboxError(f"could not start {argv[0]!r} in sandbox {self.id}: {_why(exc)}") from exc
        finally:
            with self.backend._lock:
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
            child = self._spawner().spawn(line, dict(HOST_ENV), 0, 1, 2, (data, slot))
        finally:
            os.close(data)
        code = child.wait()
        return 128 - code if code < 0 else code

    def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """A ``(host, port)`` on this machine's loopback that reaches ``port`` on the sandbox's
        loopback (TCP: a database, an HTTP server), open until the sandbox closes."""
        self._check_open()
        check_port(port, protocol)
        with self.backend._lock:
            exp = self._exposed.get(port)
        if exp is None:
            maker, pid = self.backend.socket_maker(), self.pid
            exp = self.backend._forwarder.open(port, lambda: maker.socket_in(pid))
            with self.backend._lock:
                self._exposed[port] = exp
        return exp.address

    @property
    def fs(self) -> SafeFS:
        """Files inside the sandbox (read, write, upload, download, listdir, exists, remove)."""
        if self._fs is None:

            def root() -> int:
                self._check_open()
                return os.open(f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

            self._fs = SafeFS(root, owner=None if self.backend.ids is None else self.backend.ids.root)
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
    ) -> Snapshot:
        self._check_open()
        b, store, parent = self.backend, self.backend.store, self.snapshot_of
        services = tuple(parent.services) + tuple(s for s in self.running_services if s not in parent.services)
        # Stopped cleanly first: the copy holds a shut-down service, so forks never pay recovery.
        self._stop_services()

        def record(layers: tuple[str, ...]) -> Snapshot:
            return Snapshot(
                key=key or "x" + new_id(8),
                backend=b.name,
                layers=layers,
                base=parent.base,
                env=parent.env,
                workdir=workdir or parent.workdir,
                parent=parent.key,
                description=description or f"snapshot of sandbox {self.id}",
                name=name,
                owner=store.owner if ephemeral else None,
                services=services,
            )

        snap = freeze(store, self._scratch, self.pid, self._cgroup, parent.layers, b.host.needs_squash, record)
        if ephemeral:
            b._ephemeral.append(snap.key)
        return snap

    def snapshot(self, name: str | None = None) -> Snapshot:
        """Freeze this sandbox's current files into a new snapshot; the sandbox keeps running.

        Costs what changed since the sandbox started, not the image size. Processes are not
        part of a snapshot, but services are: they are stopped cleanly for the copy and started
        again here, and every sandbox created from the snapshot starts them.
        """
        try:
            return self._freeze(name=name)
        finally:
            self._start_services()

    def fork(self) -> LocalSandbox:
        """A new sandbox from this one's current state (an ephemeral snapshot, removed when the
        backend closes). Branches see the state, not each other's later writes."""
        try:
            snap = self._freeze(ephemeral=True, description=f"fork of sandbox {self.id}")
        finally:
            self._start_services()
        return self.backend.create(snap, network=self.network or False, env=self._extra_env, limits=self._limits)

    def close(self) -> None:
        """Kill every process in the sandbox and delete its writable layer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self.backend._lock:
            running = list(self._running)
        for stop in running:
            stop.set()
        for exp in [*self._exposed.values(), *self._forwarded]:
            with contextlib.suppress(Exception):
                exp.close()
        with contextlib.suppress(ProcessLookupError, AttributeError):
            os.kill(self.pid, 9)  # pid 1 of the sandbox's pid namespace: the kernel kills the rest
        if self._uplink is not None:
            self._uplink.close()
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
        # Reaping bwrap and deleting the writable layer happen in the background: the namespace is
        # already dead, and a test suite should not wait for its teardown.
        self.backend.store.discard(self._dir, wait_for=proc, then=self._release)
        with self.backend._lock:
            self.backend._live.discard(self)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()
