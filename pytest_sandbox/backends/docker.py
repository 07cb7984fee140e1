"""The docker backend: the local engine's contract on a Docker engine (local, or remote through
DOCKER_HOST), through the ``docker`` SDK (``pip install 'pytest-sandbox[docker]'``).

A recipe becomes images tagged ``pytest-sandbox:<key>``, one per step prefix, exactly as the local
engine keys its layers; a sandbox is a container with no network; ``snapshot()`` commits it.
A networked container (and every build step) is on Docker's default bridge, a network of its
own, never the host's; where pytest runs as root on the engine's machine, its
:class:`~pytest_sandbox.types.Network` policy is loaded into its namespace (``_netfilter``), so
it reaches the internet and not this host.
Every container carries the owner token of the process that made it; a watchdog process removes
them as soon as that process dies (also on ``kill -9``, within about two seconds), and ``gc`` (run
at every start) removes any whose owner is gone.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .._build import build_env, build_recipe, host_ca_bundle, loopback_proxies, mmdebstrap_tar, run_step
from .._netfilter import Filter
from .._proc import CLIP_SH, TRUNCATED, Cancel
from ..engine.cgroups import oom_kill_count
from ..engine.expose import Exposure, Forwarder, SocketMaker
from ..errors import (
    ConfigError,
    EngineUnavailableError,
    RegistryError,
    SandboxError,
    SnapshotBuildError,
    say_once,
)
from ..image import DebianBase, Image, RegistryBase, RootfsBase, Step, env_items
from ..programs import source
from ..store import Store, match_snapshot, new_id, rmtree
from ..types import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_OUTPUT,
    DOCKER_REPOSITORY,
    ExecResult,
    Limits,
    LimitStatus,
    LogCallback,
    Network,
    Snapshot,
    Usage,
    show_limit,
)
from ._base import (
    KILL_TREE_SH,
    LABEL,
    LOGIN_SHELL,
    RemoteBackend,
    SandboxBase,
    cache_fetcher,
    check_port,
    exec_result,
    refuse_live,
    refuse_services,
    resolve_snapshot,
    wait_stoppable,
)
from ._docker_fs import DockerFS, tar_file

__all__ = ["DockerBackend", "DockerSandbox"]

REPO = DOCKER_REPOSITORY
_BUILD_CA_NAME = ".psb-host-ca.crt"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Keeps the container alive; where an image has no `sleep`, `read` blocks on the stdin Docker holds
# open for us (stdin_open), never a busy loop. (No `exec sleep`: a failed exec ends a shell.)
_HOLDER = ["/bin/sh", "-c", "while :; do sleep 3600 2>/dev/null || read _; done"]
# Output goes to files inside the container, printed once the command exits: Docker would
# otherwise hold an exec open while any background process keeps its stdout.
# Output is cut to max_output in the container (clip), so the runner never holds more of it.
_WRAP = (
    CLIP_SH + '; i=$1; c=$2; L=$3; shift 3; d=/.psb-$i; if [ -n "$c" ]; then cd -- "$c" || exit 125; fi; '
    "echo $$ > $d.pid; if [ -e $d.in ]; then in=$d.in; else in=/dev/null; fi; "
    '"$@" >$d.out 2>$d.err <$in; rc=$?; clip $d.out $L; clip $d.err $L >&2; rm -f $d.out $d.err $d.in $d.pid; exit $rc'
)


def _client() -> Any:
    try:
        import docker
    except ImportError as exc:
        raise EngineUnavailableError(
            "the docker backend needs the docker SDK: pip install 'pytest-sandbox[docker]'"
        ) from exc
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        # Connections kept for reuse: the async API runs dozens of execs at once (the SDK keeps 10).
        client = docker.from_env(timeout=120, max_pool_size=64)
        client.ping()
    except Exception as exc:
        raise EngineUnavailableError(
            f"no Docker engine answers at {where} ({exc}). Start dockerd (or Docker Desktop), set "
            "DOCKER_HOST to a running engine, or use --sandbox-backend=local."
        ) from exc
    return client


def _storage_size_support(info: dict[str, Any]) -> str:
    """Empty when docker's storage driver takes ``--storage-opt size=`` here, else why not (overlay2
    needs xfs mounted with project quotas; devicemapper, btrfs and zfs take it)."""
    driver = str(info.get("Driver", ""))
    status = {str(k): str(v) for k, v in info.get("DriverStatus") or []}
    backing = status.get("Backing Filesystem", "")
    if driver in ("devicemapper", "btrfs", "zfs", "windowsfilter"):
        return ""
    if driver == "overlay2" and backing == "xfs":
        return ""  # with pquota; without it docker refuses the option and says so
    return (
        f"the {driver} storage driver on {backing or 'this filesystem'} takes no size (overlay2 needs xfs with pquota)"
    )


def _docker_limits(limits: Limits, kwargs: dict[str, Any], storage_size: str) -> dict[str, LimitStatus]:
    """``limits`` as ``containers.run`` arguments (added to ``kwargs``), and how each is held.
    ``storage_size`` is empty where the storage driver takes a size, else why it does not."""
    status: dict[str, LimitStatus] = {}
    mem = limits.memory_bytes
    if mem is not None:
        kwargs["mem_limit"] = mem
        kwargs["memswap_limit"] = mem  # the same: no swap on top of the limit
        status["memory"] = LimitStatus("memory", mem, True, "docker --memory (--memory-swap the same)")
    if limits.pids is not None:
        kwargs["pids_limit"] = limits.pids
        status["pids"] = LimitStatus("pids", limits.pids, True, "docker --pids-limit")
    if limits.cpus is not None:
        kwargs["nano_cpus"] = int(limits.cpus * 1e9)
        status["cpus"] = LimitStatus("cpus", limits.cpus, True, "docker --cpus")
    disk = limits.disk_bytes
    if disk is not None:
        if storage_size:
            status["disk"] = LimitStatus("disk", disk, False, storage_size)
        else:
            kwargs["storage_opt"] = {"size": str(disk)}
            status["disk"] = LimitStatus("disk", disk, True, "docker --storage-opt size=")
    return status


def _label_change(key: str, value: str) -> str:
    return f"LABEL {key}={json.dumps(value)}"


class DockerBackend(RemoteBackend):
    """Recipes as images, sandboxes as containers. ``open_backend("docker")`` returns one."""

    name = "docker"
    OWNER_LABEL = "owner"

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, *, limits: Limits | None = None) -> None:
        self.client = _client()  # first: a missing SDK must give its own clear error
        import docker.errors

        self._errors = docker.errors
        self.store = Store(cache_dir)  # build locks and the owner token; images live in the engine
        self._ephemeral: list[str] = []
        self.limits = (limits or Limits()).over(DEFAULT_LIMITS)
        self.storage_size_ok = _storage_size_support(self.client.info())
        if self.limits.disk is not None and self.storage_size_ok:
            disk = show_limit("disk", self.limits.disk_bytes or 0)
            say_once(f"disk={disk} is NOT enforced on docker: {self.storage_size_ok}")
        self._start_session(source("docker_watchdog"))

    def __repr__(self) -> str:
        return f"<DockerBackend {self.client.api.base_url}>"

    # -- labels and records --------------------------------------------------------------------
    def _snapshot_of(self, key: str, img: Any) -> Snapshot:
        cfg = img.attrs.get("Config") or {}
        labels = cfg.get("Labels") or {}
        env = tuple(tuple(e.split("=", 1)) for e in cfg.get("Env") or () if "=" in e)
        return Snapshot(
            key=key,
            backend=self.name,
            layers=(),
            base={"image": f"{REPO}:{key}", "store": labels.get(f"{LABEL}.store", "")},
            env=tuple((k, v) for k, v in env if k != "PATH" or v != DEFAULT_PATH),
            workdir=cfg.get("WorkingDir") or "/",
            parent=labels.get(f"{LABEL}.parent") or None,
            created=float(labels.get(f"{LABEL}.created", "0") or 0),
            description=labels.get(f"{LABEL}.description", ""),
            name=labels.get(f"{LABEL}.name") or None,
            owner=labels.get(f"{LABEL}.ephemeral-owner") or None,
        )

    def _get(self, key: str) -> Snapshot | None:
        try:
            return self._snapshot_of(key, self.client.images.get(f"{REPO}:{key}"))
        except self._errors.ImageNotFound:
            return None

    def snapshots(self) -> Iterator[Snapshot]:
        """Every snapshot image in the engine, oldest first."""
        out = []
        # One listing call, then an inspect per image that tolerates images other processes remove
        # meanwhile (docker-py's images.list() would raise ImageNotFound for them).
        for entry in self.client.api.images(filters={"label": LABEL}):
            try:
                img = self.client.images.get(entry["Id"])
            except self._errors.ImageNotFound:
                continue
            for tag in img.tags:
                if tag.startswith(f"{REPO}:"):
                    out.append(self._snapshot_of(tag.split(":", 1)[1], img))
        return iter(sorted(out, key=lambda s: s.created))

    def get_snapshot(self, key_or_name: str) -> Snapshot:
        """A snapshot by key, unique key prefix (4+ characters) or name."""
        exact = self._get(key_or_name) if "/" not in key_or_name and ":" not in key_or_name else None
        return exact or match_snapshot(key_or_name, list(self.snapshots()), where="the Docker engine")

    def remove_snapshot(self, snapshot: Snapshot | str) -> None:
        """Untag and delete a snapshot image (containers running from it keep running)."""
        key = snapshot.key if isinstance(snapshot, Snapshot) else self.get_snapshot(snapshot).key
        with contextlib.suppress(self._errors.ImageNotFound):
            self.client.images.remove(f"{REPO}:{key}", force=True)

    def _commit(
        self,
        container: Any,
        key: str,
        *,
        parent: str | None,
        description: str,
        name: str | None = None,
        workdir: str | None = None,
        env: Mapping[str, str] | None = None,
        ephemeral: bool = False,
    ) -> Snapshot:
        changes = [
            _label_change(LABEL, "1"),
            _label_change(f"{LABEL}.parent", parent or ""),
            _label_change(f"{LABEL}.created", repr(time.time())),
            _label_change(f"{LABEL}.description", description),
            _label_change(f"{LABEL}.name", name or ""),
            _label_change(f"{LABEL}.ephemeral-owner", self.store.owner if ephemeral else ""),
            _label_change(f"{LABEL}.host", self.host),
            _label_change(f"{LABEL}.store", str(self.store.root)),
        ]
        if workdir:
            changes.append(f"WORKDIR {workdir}")
        for k, v in (env or {}).items():
            changes.append(f"ENV {k}={json.dumps(v)}")
        container.commit(repository=REPO, tag=key, changes=changes)
        snap = self._get(key)
        assert snap is not None
        if ephemeral:
            self._ephemeral.append(key)
        return snap

    # -- building ------------------------------------------------------------------------------
    def build(
        self,
        image: Image,
        *,
        on_log: LogCallback | None = None,
        rebuild: bool | float = False,
        cache_from: str | None = None,
    ) -> Snapshot:
        """Build ``image`` once per setup key into tagged images; later calls reuse them.

        ``rebuild`` works as on the local engine: steps are rebuilt, the base is kept.
        ``cache_from`` names a registry repository of pushed snapshots to pull from first.
        """
        refuse_services(image, self.name)
        log = on_log or (lambda _line: None)
        return build_recipe(
            image,
            get=self._get,
            lock=self.store.build_lock,
            build_base=self._build_base,
            build_step=self._build_step,
            on_log=on_log,
            rebuild=rebuild,
            fetch=cache_fetcher(cache_from, lambda ref: self.pull(ref, on_log=log), log) if cache_from else None,
        )

    # -- sharing -------------------------------------------------------------------------------
    def pull(self, reference: str, *, on_log: LogCallback | None = None) -> Snapshot:
        """``docker pull REPOSITORY:KEY`` (a snapshot pushed from any backend), kept as the
        snapshot of that key."""
        repo, _, key = reference.rpartition(":")
        if not repo or "/" in key or not key:
            raise ConfigError(f"pull takes REPOSITORY:KEY, got {reference!r}")
        with self.store.build_lock(key):
            have = self._get(key)
            if have is not None:
                return have
            try:
                img = self.client.images.pull(repo, tag=key)
            except self._errors.APIError as exc:
                raise RegistryError(f"docker could not pull {reference}: {exc.explanation or exc}") from exc
            labels = (img.attrs.get("Config") or {}).get("Labels") or {}
            if labels.get(LABEL) != "1":
                raise RegistryError(f"{reference} is not a pytest-sandbox snapshot (no {LABEL} label)")
            container = self.client.containers.create(img.id, command=_HOLDER, labels=self.labels())
            try:
                snap = self._commit(
                    container,
                    key,
                    parent=labels.get(f"{LABEL}.parent") or None,
                    description=labels.get(f"{LABEL}.description", ""),
                )
            finally:
                container.remove(force=True)
                with contextlib.suppress(self._errors.APIError):
                    self.client.images.remove(reference)
        if on_log is not None:
            on_log(f"pulled {snap.short} from {repo}")
        return snap

    def push(self, snapshot: Snapshot | str, repository: str, *, on_log: LogCallback | None = None) -> str:
        """``docker push`` of ``snapshot`` and its parents, tagged by key, to ``repository``."""
        snap = snapshot if isinstance(snapshot, Snapshot) else self.get_snapshot(snapshot)
        chain = snap.lineage(self._get)
        for s in chain:
            target = f"{repository}:{s.key}"
            self.client.images.get(f"{REPO}:{s.key}").tag(repository, tag=s.key)
            try:
                for line in self.client.images.push(repository, tag=s.key, stream=True, decode=True):
                    if line.get("error"):
                        raise RegistryError(f"docker could not push {target}: {line['error']}")
            finally:
                with contextlib.suppress(self._errors.APIError):
                    self.client.images.remove(target)
        if on_log is not None:
            on_log(f"pushed {snap.short} to {repository} ({len(chain)} tags)")
        return f"{repository}:{snap.key}"

    def _build_base(self, image: Image, key: str, log: LogCallback) -> Snapshot:
        b = image.base
        kind = b.kind
        desc = image.describe().splitlines()[0]
        if kind == "host":
            raise EngineUnavailableError(
                "Image.host() needs the local engine: a container cannot share the host's /usr and /etc. "
                "Use Image.debian(...), Image.from_rootfs(...) or Image.from_registry(...) on docker."
            )
        log(f"[0/{len(image.steps)}] {desc}")
        tmp = self.store.tmp_dir()
        try:
            if isinstance(b, RegistryBase):
                try:
                    self.client.images.pull(b.ref)
                except self._errors.APIError as exc:
                    raise SnapshotBuildError(
                        key=key,
                        step_index=0,
                        step_count=len(image.steps),
                        step=desc,
                        exit_code=None,
                        output=str(exc),
                        reason="pull failed",
                    ) from exc
                source = b.ref
            else:
                tar = tmp / "rootfs.tar"
                if isinstance(b, DebianBase):
                    mmdebstrap_tar(b, key, tar, len(image.steps), log)
                elif isinstance(b, RootfsBase):
                    src = b.path
                    if src.is_dir():
                        subprocess.run(["tar", "-C", str(src), "-cf", str(tar), "."], check=True, capture_output=True)
                    else:
                        tar = src
                source = f"{REPO}:import-{key[:12]}"
                self.client.api.import_image_from_file(
                    str(tar), repository=REPO, tag=f"import-{key[:12]}", changes=[f"ENV PATH={DEFAULT_PATH}"]
                )
            container = self.client.containers.create(source, command=_HOLDER, labels=self.labels())
            try:
                return self._commit(container, key, parent=None, description=desc, workdir="/")
            finally:
                container.remove(force=True)
                if kind != "registry":
                    with contextlib.suppress(self._errors.ImageNotFound):
                        self.client.images.remove(source)
        finally:
            rmtree(tmp)

    def _build_step(self, parent: Snapshot, step: Step, key: str, i: int, n: int, log: LogCallback) -> Snapshot:
        if step.kind == "env":
            container = self.client.containers.create(f"{REPO}:{parent.key}", command=_HOLDER, labels=self.labels())
            try:
                return self._commit(container, key, parent=parent.key, description=step.describe(), env=dict(step.env))
            finally:
                container.remove(force=True)
        env, proxies = loopback_proxies(build_env(f"/{_BUILD_CA_NAME}"))
        sb = DockerSandbox(self, parent, network=Network(), env={}, proxies=proxies)
        try:
            # The host CA goes in as a file for this step only, removed before the commit.
            ca = host_ca_bundle()
            if ca:
                sb.container.put_archive("/", tar_file(_BUILD_CA_NAME, Path(ca).read_bytes(), 0o644))
            try:
                workdir = run_step(
                    sb,
                    step,
                    key=key,
                    index=i,
                    count=n,
                    workdir=parent.workdir,
                    env=env,
                    log=log,
                )
            finally:
                if ca:
                    sb._exec_raw(["rm", "-f", f"/{_BUILD_CA_NAME}"])
            return self._commit(sb.container, key, parent=parent.key, description=step.describe(), workdir=workdir)
        finally:
            sb.close()

    # -- sandboxes -----------------------------------------------------------------------------
    def create(
        self,
        snapshot: Snapshot | Image | str,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> DockerSandbox:
        """A new container from a snapshot (an Image is built first); no network unless asked
        (then Docker's bridge, with ``network``'s policy where it can be held: see the module);
        ``limits`` over the backend's become docker's --memory, --pids-limit, --cpus flags."""
        policy = Network.of(network)
        self._check_backend_open()
        snapshot = resolve_snapshot(self, snapshot)
        wanted = self.limits if limits is None else limits.over(self.limits)
        sb = DockerSandbox(self, snapshot, network=policy, env=dict(env_items(env or {})), limits=wanted)
        with self._lock:
            self._live.add(sb)
        return sb

    def usage(self, snapshot: Snapshot) -> Usage:
        """The engine keeps image layers shared between tags: no per-snapshot size is told."""
        return Usage()

    def location(self) -> str:
        """The Docker engine this backend talks to."""
        return f"on the Docker engine at {os.environ.get('DOCKER_HOST') or 'unix:///var/run/docker.sock'}"

    def gc(self, *, wait: bool = True) -> int:
        """Remove containers and ephemeral snapshots of processes on this host that died
        (``wait=False``: skip the local store's part if another process holds it)."""
        removed = 0
        flt = {"label": [f"{LABEL}.host={self.host}"]}
        for c in self.client.containers.list(all=True, filters=flt, ignore_removed=True):
            # Owners are judged in the store that made them: other cache directories on this host
            # (other users, other projects) have their own live processes.
            if not self.store.owner_alive(c.labels.get(f"{LABEL}.owner"), c.labels.get(f"{LABEL}.store")):
                with contextlib.suppress(self._errors.NotFound, self._errors.APIError):
                    c.remove(force=True)
                    removed += 1
        for snap in list(self.snapshots()):
            if snap.owner and not self.store.owner_alive(snap.owner, snap.base.get("store")):
                self.remove_snapshot(snap)
                removed += 1
        return removed + self.store.gc(wait=wait)

    def reaches_in(self) -> bool:
        """Whether this process may enter containers' namespaces: root, with the engine on this
        machine (``DOCKER_HOST`` unix://)."""
        where = os.environ.get("DOCKER_HOST") or "unix://"
        return os.geteuid() == 0 and where.startswith("unix://")

    @functools.cached_property
    def netfilter(self) -> Filter:
        """Loads networked containers' policies (see the module)."""
        return Filter(str(self.store.root / "xtables.lock"))

    @functools.cached_property
    def forwarder(self) -> Forwarder:
        """The event loop that carries every exposed port's connections (started on first use)."""
        return Forwarder()

    def socket_maker(self) -> SocketMaker:
        """The helper that makes sockets inside containers' networks (started on first use)."""
        with self._lock:
            maker: SocketMaker = self.__dict__.get("_maker") or SocketMaker([])
            self.__dict__["_maker"] = maker
            return maker

    def _release(self) -> None:
        for key in self._ephemeral:
            with contextlib.suppress(Exception):
                self.remove_snapshot(key)
        if "forwarder" in self.__dict__:
            self.forwarder.close()
        if "_maker" in self.__dict__:
            self.__dict__["_maker"].close()


class DockerSandbox(SandboxBase):
    """A container of the docker backend. Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        backend: DockerBackend,
        snapshot: Snapshot,
        *,
        network: Network | None,
        env: dict[str, str],
        build: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        proxies: Mapping[int, tuple[str, int]] | None = None,
    ) -> None:
        self.backend = backend
        self._limits = limits
        self.snapshot_of = snapshot
        self.network = network
        self.id = new_id(6)
        self.history: list[ExecResult] = []
        self._extra_env = env
        self._closed = False
        self._fs: DockerFS | None = None
        backend._watchdog.ensure()
        kwargs: dict[str, Any] = {
            "command": _HOLDER,
            "detach": True,
            "init": True,
            "stdin_open": True,
            "labels": backend.labels(**{f"{LABEL}.key": snapshot.key}),
            # A network of its own (the bridge), never the host's; no raw sockets, whose packets
            # would pass around the policy's rules.
            "network_mode": "none" if network is None else "bridge",
            "environment": env,
            "working_dir": snapshot.workdir,
            "hostname": "sandbox",
        }
        if network is not None:
            kwargs["cap_drop"] = ["NET_RAW"]
        self._status = _docker_limits(limits, kwargs, backend.storage_size_ok)
        self._oom_file: Path | Literal[False] | None = None  # None: not looked for yet
        try:
            self.container = backend.client.containers.run(f"{REPO}:{snapshot.key}", **kwargs)
        except backend._errors.APIError as exc:
            raise SandboxError(f"docker could not start a container of {snapshot.short}: {exc}") from exc
        self._forwarded: list[Exposure] = []
        if network is not None:
            try:
                self._hold_network(network, dict(proxies or {}))
            except BaseException:
                self.close()
                raise

    def _hold_network(self, policy: Network, proxies: dict[int, tuple[str, int]]) -> None:
        """Load ``policy`` into the container's network namespace, and forward ``proxies`` (host
        loopback ports a build step's proxy variables name) into it, where this process can."""
        b = self.backend
        if not b.reaches_in():
            say_once(
                "the docker backend holds a networked container's reach (no link-local services such as cloud "
                "metadata, none of this host's addresses) only where pytest runs as root on the Docker engine's "
                "machine: here its containers reach them. Run as root there, or use the local engine"
            )
            if proxies:
                say_once("build steps on the docker backend cannot use a proxy on this host's loopback here")
            return
        self.container.reload()
        pid = int(self.container.attrs["State"]["Pid"])
        nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        b.netfilter.apply([nsenter, "-t", str(pid), "-n", "--"], policy, dns=_nameservers(self.container.attrs))
        for port, target in proxies.items():
            self._forwarded.append(b.forwarder.open_inward(b.socket_maker(), pid, port, target))

    @property
    def limits(self) -> dict[str, LimitStatus]:
        """Each limit of this container and how docker holds it (or why it does not)."""
        return dict(self._status)

    def oom_kills(self) -> int:
        """OOM kills in the container's memory cgroup so far (0 where the host path is unknown)."""
        if self._oom_file is None:  # looked for once: every exec reads it twice
            cid = self.container.id
            candidates = (
                Path(f"/sys/fs/cgroup/memory/docker/{cid}/memory.oom_control"),  # v1, cgroupfs driver
                Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.events"),  # v2, systemd
                Path(f"/sys/fs/cgroup/docker/{cid}/memory.events"),  # v2, cgroupfs
            )
            self._oom_file = next((p for p in candidates if p.exists()), False)
        return (oom_kill_count(self._oom_file) or 0) if self._oom_file else 0

    def __repr__(self) -> str:
        return f"<DockerSandbox {self.id} of {self.snapshot_of.short} container {self.container.short_id}>"

    def _exec_raw(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[int, bytes, bytes]:
        api = self.backend.client.api
        eid = api.exec_create(self.container.id, list(argv), environment=dict(env or {}))["Id"]
        out, err = api.exec_start(eid, demux=True)
        return int(api.exec_inspect(eid)["ExitCode"]), out or b"", err or b""

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
        cancel: Cancel | None = None,
    ) -> ExecResult:
        self._check_open()
        api = self.backend.client.api
        tag = new_id(6)
        limit = DEFAULT_MAX_OUTPUT if max_output is None else max_output
        if isinstance(input, str):
            input = input.encode()
        if input:
            self.container.put_archive("/", tar_file(f".psb-{tag}.in", input, 0o600))
        env = {**self._extra_env, **(env or {})}
        ooms = self.oom_kills()
        start = time.perf_counter()
        if on_line is not None:  # builds stream their output live
            eid = api.exec_create(self.container.id, list(argv), environment=env, workdir=cwd or None)["Id"]
            chunks: list[bytes] = []
            partial = b""
            for chunk in api.exec_start(eid, stream=True):
                chunks.append(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", errors="replace"))
            if partial:
                on_line(partial.decode("utf-8", errors="replace"))
            code = int(api.exec_inspect(eid)["ExitCode"])
            out, err = b"".join(chunks), b""
            timed_out = False
        else:
            eid = api.exec_create(
                self.container.id, ["/bin/sh", "-c", _WRAP, "sh", tag, cwd or "", str(limit), *argv], environment=env
            )["Id"]

            def begin() -> tuple[bytes | None, bytes | None]:
                try:
                    pair: tuple[bytes | None, bytes | None] = api.exec_start(eid, demux=True)
                    return pair
                except Exception as exc:
                    raise SandboxError(f"docker exec failed: {exc}") from exc

            def kill() -> None:
                # The wrapper writes its pid first thing; a cancel can come before it has.
                for _ in range(40):
                    _, pid, _ = self._exec_raw(["cat", f"/.psb-{tag}.pid"])
                    if pid.strip():
                        break
                    time.sleep(0.05)
                self._exec_raw(["/bin/sh", "-c", KILL_TREE_SH, "sh", pid.decode().strip()])

            pair, stopped = wait_stoppable(begin, timeout=timeout, cancel=cancel, kill=kill)
            timed_out = stopped and not (cancel is not None and cancel.is_set())
            if stopped:
                clip = ["/bin/sh", "-c", CLIP_SH + '; clip "$1" "$2"', "sh"]
                _, out, _ = self._exec_raw([*clip, f"/.psb-{tag}.out", str(limit)])
                _, err, _ = self._exec_raw([*clip, f"/.psb-{tag}.err", str(limit)])
                self._exec_raw(["/bin/sh", "-c", f"rm -f /.psb-{tag}.*"])
                code = 137
            else:
                assert pair is not None
                out, err = pair[0] or b"", pair[1] or b""
                code = int(api.exec_inspect(eid)["ExitCode"])
        return exec_result(
            self.history,
            argv,
            exit_code=code,
            stdout=out,
            stderr=err,
            duration=time.perf_counter() - start,
            timed_out=timed_out,
            timeout=timeout,
            truncated=TRUNCATED.encode() in out or TRUNCATED.encode() in err,
            max_output=max_output,
            oom_killed=code == 137 and self.oom_kills() > ooms,
        )

    @property
    def fs(self) -> DockerFS:
        """Files inside the container (the same operations as the local engine's ``fs``)."""
        if self._fs is None:
            self._fs = DockerFS(self)
        return self._fs

    def snapshot(self, name: str | None = None, *, ephemeral: bool = False, live: bool = False) -> Snapshot:
        """Commit the container's files into a new snapshot image; the container keeps running.
        ``live=True`` raises :class:`EngineUnavailableError`: docker checkpoints are experimental
        and restore into the same container only."""
        self._check_open()
        if live:
            raise refuse_live("docker", "use the local engine (backend='local') as root, or take snapshots of files")
        key = "x" + new_id(8)
        return self.backend._commit(
            self.container,
            key,
            parent=self.snapshot_of.key,
            description=f"snapshot of sandbox {self.id}",
            name=name,
            ephemeral=ephemeral,
        )

    def interactive(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` (default: a login shell) in the container on this terminal, through the
        docker CLI (``docker exec``); returns its exit code."""
        self._check_open()
        cli = shutil.which("docker")
        if cli is None:
            raise SandboxError("an interactive command on the docker backend needs the docker CLI on PATH")
        tty = ["-t"] if sys.stdin.isatty() else []
        envs = [f"--env={k}={v}" for k, v in {**self._extra_env, **(env or {})}.items()]
        return subprocess.call([cli, "exec", "-i", *tty, *envs, self.container.id, *(argv or LOGIN_SHELL)])

    def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """A ``(host, port)`` on this machine's loopback that reaches ``port`` on the container's
        loopback (TCP), open until the sandbox closes. The forwarder enters the container's
        network namespace, so it needs root and the engine on this machine."""
        self._check_open()
        check_port(port, protocol)
        if not self.backend.reaches_in():
            raise EngineUnavailableError(
                "expose() on the docker backend enters the container's network namespace: it needs root "
                "and a Docker engine on this machine (DOCKER_HOST unix://). Use the local engine, or "
                "network=True and the container's own ports."
            )
        exposed: dict[int, Exposure] = self.__dict__.setdefault("_exposed", {})
        if port not in exposed:
            self.container.reload()
            pid = int(self.container.attrs["State"]["Pid"])
            maker = self.backend.socket_maker()
            exposed[port] = self.backend.forwarder.open(port, lambda: maker.socket_in(pid))
        return exposed[port].address

    def fork(self, *, live: bool = False) -> DockerSandbox:
        """A new container from this one's current state (an ephemeral snapshot); ``live=True``
        raises as :meth:`snapshot` does."""
        snap = self.snapshot(ephemeral=True, live=live)
        return self.backend.create(snap, network=self.network or False, env=self._extra_env)

    def close(self) -> None:
        """Remove the container and everything running in it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for exp in [*self.__dict__.get("_exposed", {}).values(), *self.__dict__.get("_forwarded", ())]:
            with contextlib.suppress(Exception):
                exp.close()
        with contextlib.suppress(Exception):
            self.container.remove(force=True)
        with self.backend._lock:
            self.backend._live.discard(self)


def _nameservers(attrs: Mapping[str, Any]) -> list[str]:
    """The IPv4 name servers of a container's ``/etc/resolv.conf`` (Docker writes it on the host)."""
    try:
        text = Path(str(attrs.get("ResolvConfPath") or "")).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        word, _, value = line.strip().partition(" ")
        if word == "nameserver":
            with contextlib.suppress(ValueError):
                out.append(str(ipaddress.IPv4Address(value.strip())))
    return out
