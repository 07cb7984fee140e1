"""The daytona backend: sandboxes on Daytona, through the ``daytona`` SDK
(``pip install 'pytest-sandbox[daytona]'``), configured by the SDK's own DAYTONA_API_KEY,
DAYTONA_API_URL and DAYTONA_TARGET.

A recipe becomes Daytona snapshots named ``pytest-sandbox-<key>``, one per step prefix that
changes files, so every machine and CI job running the same recipe finds the same snapshots. The
base is built by Daytona's image builder; each step runs in a sandbox of the previous snapshot,
which ``create_snapshot`` then freezes. Sandboxes carry labels (session, host, key), have no network
unless asked, and auto-stop after an idle hour and are deleted when stopped. A watchdog process
deletes this session's sandboxes when it dies, and ``gc`` (run at every start) deletes those of
sessions on this host that died.

``pytest-sandbox serve --daytona`` runs a Daytona-compatible API backed by the local engine, for
offline use and for this backend's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from .._build import build_env, build_recipe, host_ca_bundle, run_step, step_argv
from .._offload import offload, unstoppable
from .._proc import TRUNCATED, Cancel
from ..errors import (
    ConfigError,
    EngineUnavailableError,
    SandboxError,
    SnapshotBuildError,
)
from ..image import DebianBase, HostBase, Image, RegistryBase, Step, env_items
from ..programs import source
from ..store import Store, match_snapshot, new_id, write_atomic
from ..types import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_OUTPUT,
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
    LABEL,
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
from ._daytona_async import AsyncClients
from ._daytona_exec import RETRIES, kill_command, retry_delay, unwrap, wrap
from ._daytona_fs import DaytonaFS
from ._daytona_recipe import GIB, PREFIX, recipe_meta, remote_name, resources_of, sizes_tag

__all__ = ["DaytonaBackend", "DaytonaSandbox"]

AUTO_STOP_MINUTES = 60  # the safety net for sandboxes nobody deletes: stopped after an idle hour...
AUTO_DELETE_MINUTES = 0  # ...and deleted as soon as they stop
_BUILD_CA = "/tmp/.psb-host-ca.crt"
_T = TypeVar("_T")


def _sdk() -> Any:
    try:
        import daytona
    except ImportError as exc:
        raise EngineUnavailableError(
            "the daytona backend needs the Daytona SDK: pip install 'pytest-sandbox[daytona]'"
        ) from exc
    return daytona


class DaytonaBackend(RemoteBackend):
    """Recipes as Daytona snapshots, sandboxes as Daytona sandboxes. ``open_backend("daytona")``."""

    name = "daytona"

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, *, limits: Limits | None = None) -> None:
        self.limits = (limits or Limits()).over(DEFAULT_LIMITS)
        # Daytona sizes a sandbox by its snapshot: the limits given here size the snapshots this
        # backend builds. The local defaults (half of *this* machine's memory) mean nothing there.
        self.asked = limits or Limits()
        self.resources = resources_of(self.asked)
        sdk = _sdk()  # first: a missing SDK must give its own clear error
        self._sdk = sdk
        if not (os.environ.get("DAYTONA_API_KEY") or os.environ.get("DAYTONA_JWT_TOKEN")):
            raise ConfigError(
                "the daytona backend needs credentials: set DAYTONA_API_KEY (and DAYTONA_API_URL for a "
                "self-hosted Daytona). To use local sandboxes through Daytona's API, run "
                "`pytest-sandbox serve --daytona` and set DAYTONA_API_URL=http://127.0.0.1:3986/api "
                "DAYTONA_API_KEY=local."
            )
        self.api_url = os.environ.get("DAYTONA_API_URL") or "https://app.daytona.io/api"
        self.target = os.environ.get("DAYTONA_TARGET") or None
        try:
            self.client = sdk.Daytona()
        except sdk.DaytonaError as exc:
            raise ConfigError(f"the Daytona SDK refused its configuration: {exc}") from exc
        self.store = Store(cache_dir)  # build locks, the owner token and snapshot records
        # Records of the snapshots this backend made, apart per size: one recipe built with other
        # resources is another Daytona snapshot under the same setup key.
        self._records = self.store.root / ("daytona" + sizes_tag(self.resources))
        self._records.mkdir(exist_ok=True)
        self._start_session(source("daytona_watchdog"))

    def __repr__(self) -> str:
        return f"<DaytonaBackend {self.api_url}>"

    @property
    def async_clients(self) -> AsyncClients:
        """The SDK's ``AsyncDaytona`` clients the async API's execs go through."""
        if "_async_clients" not in self.__dict__:
            self.__dict__["_async_clients"] = AsyncClients(self._sdk, self.api_url, self.target)
        clients: AsyncClients = self.__dict__["_async_clients"]
        return clients

    async def aclose(self) -> None:
        """Close the running event loop's ``AsyncDaytona`` client (the async API does, at its end)."""
        if "_async_clients" in self.__dict__:
            await self.async_clients.close()

    # -- calling the SDK -----------------------------------------------------------------------
    def call(
        self, what: str, fn: Callable[..., _T], *args: Any, passthrough: tuple[type[Exception], ...] = (), **kwargs: Any
    ) -> _T:
        """One SDK call: rate limiting (HTTP 429) backs off and retries; other failures become a
        :class:`SandboxError` that says what failed and what to do, with the SDK's error chained.
        SDK errors of the ``passthrough`` types reach the caller unchanged."""
        for attempt in range(RETRIES):
            try:
                return fn(*args, **kwargs)
            except passthrough:
                raise
            except Exception as exc:
                time.sleep(retry_delay(self._sdk, exc, what, self.api_url, self.target, attempt))
        raise AssertionError("unreachable")

    def _remote(self, name: str) -> Any | None:
        """The Daytona snapshot called ``name``, waiting while another machine builds it; None when
        it does not exist or its build failed (which is then removed, so it can be built again)."""
        sdk = self._sdk
        deadline = time.monotonic() + 3600
        while True:
            try:
                snap = self.call(
                    "look up a snapshot", self.client.snapshot.get, name, passthrough=(sdk.DaytonaNotFoundError,)
                )
            except sdk.DaytonaNotFoundError:
                return None
            state = str(getattr(snap.state, "value", snap.state))
            if state == "active":
                return snap
            if state in ("error", "build_failed"):
                with contextlib.suppress(SandboxError):
                    self.call("remove a failed snapshot", self.client.snapshot.delete, snap)
                return None
            if time.monotonic() > deadline:
                raise SandboxError(f"Daytona snapshot {name} stayed {state} for an hour; remove it and retry")
            time.sleep(1.0)

    # -- records -------------------------------------------------------------------------------
    def _record_path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ConfigError(f"snapshot key {key!r} is not valid")
        return self._records / f"{key}.json"

    def _put(self, snap: Snapshot) -> Snapshot:
        write_atomic(self._record_path(snap.key), json.dumps(snap.to_json()))
        return snap

    def _records_all(self) -> list[Snapshot]:
        out = []
        for p in self._records.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                out.append(Snapshot.from_json(json.loads(p.read_text())))
        return out

    def _snapshot(self, key: str, meta: Mapping[str, Any], created: float, **extra: Any) -> Snapshot:
        return self._put(
            Snapshot(
                key=key,
                backend=self.name,
                base={"snapshot": meta["remote"]},
                env=tuple(sorted(meta["env"].items())),
                workdir=meta["workdir"],
                parent=meta["parent"],
                created=created,
                description=meta["description"],
                **extra,
            )
        )

    # -- snapshots -----------------------------------------------------------------------------
    def snapshots(self) -> Iterator[Snapshot]:
        """Snapshots this machine built or took that still exist on Daytona, oldest first."""
        names = {s.name for s in self._list_remote()}
        out = []
        for snap in self._records_all():
            if snap.base.get("snapshot") in names:
                out.append(snap)
            else:
                self._record_path(snap.key).unlink(missing_ok=True)
        return iter(sorted(out, key=lambda s: s.created))

    def _list_remote(self) -> list[Any]:
        out, page = [], 1
        while True:
            res = self.call("list snapshots", self.client.snapshot.list, page=page, limit=200)
            out += [s for s in res.items if s.name.startswith(PREFIX)]
            if page >= (res.total_pages or 1):
                return out
            page += 1

    def get_snapshot(self, key_or_name: str) -> Snapshot:
        """A snapshot by key, unique key prefix (4+ characters) or name."""
        with contextlib.suppress(ConfigError, OSError, ValueError):
            snap = Snapshot.from_json(json.loads(self._record_path(key_or_name).read_text()))
            if self._remote(snap.base["snapshot"]) is not None:
                return snap
        return match_snapshot(key_or_name, list(self.snapshots()), where=f"Daytona at {self.api_url}")

    def remove_snapshot(self, snapshot: Snapshot | str) -> None:
        """Delete a snapshot from Daytona (sandboxes running from it keep running)."""
        snap = snapshot if isinstance(snapshot, Snapshot) else self.get_snapshot(snapshot)
        name = snap.base.get("snapshot", "")
        # Env-only steps share their parent's Daytona snapshot: only the owner of the name deletes it.
        if name.startswith(remote_name(snap.key)):
            remote = self._remote(name)
            if remote is not None:
                self.call("delete a snapshot", self.client.snapshot.delete, remote)
        self._record_path(snap.key).unlink(missing_ok=True)

    # -- building ------------------------------------------------------------------------------
    def build(
        self,
        image: Image,
        *,
        on_log: LogCallback | None = None,
        rebuild: bool | float = False,
        cache_from: str | None = None,
    ) -> Snapshot:
        """Build ``image`` once per setup key into Daytona snapshots; later calls (from any
        machine) reuse them. A snapshot another machine is building is waited for.

        ``cache_from`` names a registry repository of snapshots pushed from the local engine or
        docker: Daytona makes the snapshot of the deepest key found there from that image (the
        registry must be one Daytona can pull from), and only the later steps are built."""
        if not isinstance(image, Image):
            raise ConfigError(f"build() takes an Image, got {type(image).__name__}")
        refuse_services(image, self.name)
        keys = image.prefix_keys()
        metas = dict(zip(keys, recipe_meta(image, sizes_tag(self.resources)), strict=True))

        def get(key: str) -> Snapshot | None:
            meta = metas[key]
            remote = self._remote(meta["remote"])
            if remote is None:
                return None
            return self._snapshot(key, meta, _timestamp(remote.created_at))

        def build_base(img: Image, key: str, log: LogCallback) -> Snapshot:
            return self._build_base(img, key, metas[key], log)

        def build_step(parent: Snapshot, step: Step, key: str, i: int, n: int, log: LogCallback) -> Snapshot:
            return self._build_step(parent, step, key, metas[key], i, n, log)

        log = on_log or (lambda _line: None)

        def from_image(reference: str) -> Snapshot:
            key = reference.rpartition(":")[2]
            with self.store.build_lock(key):
                snap = get(key)
                if snap is None:  # not made by another process meanwhile
                    snap = self._create_from(key, metas[key], reference, len(image.steps), log)
                    log(f"pulled {snap.short} from {reference.rpartition(':')[0]}")
            return snap

        return build_recipe(
            image,
            get=get,
            lock=self.store.build_lock,
            build_base=build_base,
            build_step=build_step,
            on_log=on_log,
            rebuild=rebuild,
            fetch=cache_fetcher(cache_from, from_image, log) if cache_from else None,
        )

    def _daytona_image(self, image: Image, key: str) -> Any:
        b = image.base
        if isinstance(b, RegistryBase):
            return b.ref
        if isinstance(b, DebianBase):
            img = self._sdk.Image.base(f"debian:{b.suite}")
            if b.include:
                img = img.run_commands(step_argv(Step("apt", b.include))[2])
            return img
        if isinstance(b, HostBase):
            raise EngineUnavailableError(
                "Image.host() needs the local engine: a Daytona sandbox cannot share this machine's /usr "
                "and /etc. Use Image.debian(...) or Image.from_registry(...) on daytona."
            )
        raise EngineUnavailableError(
            "Image.from_rootfs(...) cannot be sent to Daytona: import the rootfs into a registry image "
            "(e.g. `docker import`, then push) and use Image.from_registry(...)."
        )

    def _build_base(self, image: Image, key: str, meta: Mapping[str, Any], log: LogCallback) -> Snapshot:
        log(f"[0/{len(image.steps)}] {meta['description']}")
        return self._create_from(key, meta, self._daytona_image(image, key), len(image.steps), log)

    def _create_from(self, key: str, meta: Mapping[str, Any], source: Any, nsteps: int, log: LogCallback) -> Snapshot:
        """The Daytona snapshot of ``key`` made from ``source`` (an image reference or recipe)."""
        sdk = self._sdk
        desc = meta["description"]
        resources = sdk.Resources(**self.resources) if self.resources else None
        params = sdk.CreateSnapshotParams(name=meta["remote"], image=source, resources=resources)
        try:
            snap = self.call(
                "build a snapshot",
                self.client.snapshot.create,
                params,
                on_logs=lambda line: log("    " + line),  # Daytona's build output, not our step headers
                timeout=0,
                passthrough=(sdk.DaytonaError,),
            )
        except sdk.DaytonaConflictError:
            snap = self._remote(meta["remote"])  # another machine is building it: wait for theirs
            if snap is None:
                raise SandboxError(f"Daytona snapshot {meta['remote']} failed to build elsewhere; retry") from None
        except sdk.DaytonaError as exc:
            raise SnapshotBuildError(
                key=key,
                step_index=0,
                step_count=nsteps,
                step=desc,
                exit_code=None,
                output=str(exc),
                reason=f"Daytona could not make a snapshot from {source if isinstance(source, str) else 'the base'}",
            ) from exc
        return self._snapshot(key, meta, _timestamp(snap.created_at))

    def _build_step(
        self, parent: Snapshot, step: Step, key: str, meta: Mapping[str, Any], i: int, n: int, log: LogCallback
    ) -> Snapshot:
        if step.kind == "env":
            return self._snapshot(key, meta, time.time())
        sdk = self._sdk
        sb = DaytonaSandbox(self, parent, network=Network(), env={})
        try:
            ca = host_ca_bundle()
            if ca:  # only for this step: removed before the snapshot is taken
                sb.fs.write(_BUILD_CA, Path(ca).read_bytes())
            try:
                run_step(sb, step, key=key, index=i, count=n, workdir=parent.workdir, env=build_env(_BUILD_CA), log=log)
            finally:
                if ca:
                    sb.fs.remove(_BUILD_CA)
            stale = self._remote(meta["remote"])  # a rebuild replaces the old snapshot of this key
            if stale is not None:
                self.call("delete a snapshot", self.client.snapshot.delete, stale)
            try:
                self.call(
                    "snapshot a sandbox",
                    sb.sdk.create_snapshot,
                    meta["remote"],
                    timeout=0,
                    passthrough=(sdk.DaytonaConflictError,),
                )
            except sdk.DaytonaConflictError:
                if self._remote(meta["remote"]) is None:
                    raise
        finally:
            sb.close()
        return self._snapshot(key, meta, time.time())

    # -- sandboxes -----------------------------------------------------------------------------
    def create(
        self,
        snapshot: Snapshot | Image | str,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> DaytonaSandbox:
        """A new Daytona sandbox from a snapshot (an Image is built first); no network unless asked.

        ``network``'s ``allow`` list becomes Daytona's allow-lists (CIDRs: ``network_allow_list``,
        names: ``domain_allow_list``); Daytona has no deny-list, so ``deny`` is refused. Daytona
        sizes a sandbox by its snapshot: the backend's limits size the snapshots it builds, and
        ``limits`` other than those cannot be applied here (``sb.limits`` says so)."""
        policy = Network.of(network)
        if policy is not None and policy.deny:
            raise ConfigError(
                "Daytona takes allow-lists only (network_allow_list, domain_allow_list): give Network(allow=[...]) "
                "on the daytona backend, or use the local engine for a deny-list"
            )
        self._check_backend_open()
        snapshot = resolve_snapshot(self, snapshot)
        wanted = self.asked if limits is None else limits.over(self.asked)
        return DaytonaSandbox(self, snapshot, network=policy, env=dict(env_items(env or {})), limits=wanted)

    def usage(self, snapshot: Snapshot) -> Usage:
        """Daytona does not tell a snapshot's size through its API."""
        return Usage()

    def location(self) -> str:
        """The Daytona API this backend talks to."""
        return f"on {self.api_url}"

    def gc(self, *, wait: bool = True) -> int:
        """Delete sandboxes of sessions on this host that died, found by their labels
        (``wait=False``: skip the local store's part if another process holds it)."""
        removed = 0
        query = self._sdk.ListSandboxesQuery(labels={f"{LABEL}.host": self.host})
        for remote in self.call("list sandboxes", lambda: list(self.client.list(query))):
            # Sessions are judged in the store that made them (other cache directories on this host
            # have their own live processes).
            alive = self.store.owner_alive(remote.labels.get(f"{LABEL}.session"), remote.labels.get(f"{LABEL}.store"))
            if not alive:
                with contextlib.suppress(SandboxError):
                    self.call("delete a sandbox", remote.delete)
                    removed += 1
        return removed + self.store.gc(wait=wait)


def _allow_lists(network: Network | None) -> dict[str, str]:
    """A policy's allow-list as Daytona's two: addresses and networks, and names."""
    if network is None or not network.allow:
        return {}
    nets = [x for x in network.allow if _is_network(x)]
    names = [x for x in network.allow if x not in nets]
    return {
        **({"network_allow_list": ",".join(nets)} if nets else {}),
        **({"domain_allow_list": ",".join(names)} if names else {}),
    }


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry)
    except ValueError:
        return False
    return True


KILL_TIMEOUT = 600
"""Seconds the command that kills a cancelled exec's tree may take: it walks /proc in the sandbox
pass by pass, which on a loaded machine, with a thousand processes, takes far more than a minute
can give (a kill cut short leaves the tree stopped, not dead)."""


def _sdk_timeout(timeout: float | None) -> int | None:
    # The wrapper enforces the timeout; the SDK's is the net under it, for a sandbox that hangs.
    return None if timeout is None else int(timeout) + 60


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    with contextlib.suppress(TypeError, ValueError):
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return time.time()


class DaytonaSandbox(SandboxBase):
    """A Daytona sandbox. Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        backend: DaytonaBackend,
        snapshot: Snapshot,
        *,
        network: Network | None,
        env: dict[str, str],
        sdk_sandbox: Any = None,
        limits: Limits | None = None,
    ) -> None:
        self.backend = backend
        self._limits = backend.asked if limits is None else limits
        self.snapshot_of = snapshot
        self.network = network
        self.history: list[ExecResult] = []
        self._extra_env = env
        self._closed = False
        self._fs: DaytonaFS | None = None
        backend._watchdog.ensure()
        if sdk_sandbox is None:
            params = backend._sdk.CreateSandboxFromSnapshotParams(
                snapshot=snapshot.base["snapshot"],
                env_vars={**dict(snapshot.env), **env},
                labels=backend.labels(**{f"{LABEL}.key": snapshot.key}),
                network_block_all=network is None,
                **_allow_lists(network),
                auto_stop_interval=AUTO_STOP_MINUTES,
                auto_delete_interval=AUTO_DELETE_MINUTES,
                os_user="root",
                target=backend.target,
            )
            sdk_sandbox = backend.call(f"create a sandbox of {snapshot.short}", backend.client.create, params)
        self.sdk = sdk_sandbox
        self.id = str(self.sdk.id)
        with backend._lock:
            backend._live.add(self)

    @property
    def limits(self) -> dict[str, LimitStatus]:
        """What Daytona gave this sandbox (its snapshot's resources), and whether that is what was
        asked: Daytona sizes in whole cores and GiB, by snapshot, and has no process limit."""
        given = {  # what Daytona gave, and in which of its units that was asked
            "cpus": (float(self.sdk.cpu or 0), "cpu", 1),
            "memory": (int(self.sdk.memory or 0) * GIB, "memory", GIB),
            "disk": (int(self.sdk.disk or 0) * GIB, "disk", GIB),
        }
        asked = dict(self._limits.items())
        want = resources_of(self._limits)
        out: dict[str, LimitStatus] = {}
        if "pids" in asked:
            out["pids"] = LimitStatus("pids", asked["pids"], False, "Daytona sets no process limit")
        for name, (have, unit, scale) in given.items():
            if name not in asked:
                out[name] = LimitStatus(name, have, True, "Daytona resources of the snapshot (its defaults)")
            elif want[unit] * scale == have:
                out[name] = LimitStatus(name, have, True, "Daytona resources of the snapshot, in whole units")
            else:
                out[name] = LimitStatus(
                    name,
                    asked[name],
                    False,
                    f"Daytona sized this sandbox by its snapshot ({show_limit(name, have)}); give the backend "
                    "these limits (--sandbox-limits) so that it builds snapshots of that size",
                )
        return out

    def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """``protocol="http"`` only, through Daytona's preview link: the ``(host, port)`` of the
        link (443 for https). A private sandbox's link needs the ``X-Daytona-Preview-Token``
        header, whose value is ``preview_token(port)``. Other protocols cannot reach a Daytona
        sandbox, and ``tcp`` (the default) says so."""
        self._check_open()
        check_port(port, protocol)
        if protocol != "http":
            raise EngineUnavailableError(
                f"Daytona reaches a sandbox's ports through HTTP(S) preview links only, so port {port} cannot be "
                "exposed as TCP (a database, a raw protocol): for an HTTP server call expose(port, protocol='http'); "
                "for other protocols use the local engine or docker"
            )
        link = self._preview(port)
        url = urllib.parse.urlsplit(str(link.url))
        if url.hostname is None:
            raise SandboxError(f"Daytona gave no usable preview link for port {port}: {link.url!r}")
        return url.hostname, url.port or (443 if url.scheme == "https" else 80)

    def preview_token(self, port: int) -> str:
        """The token a request to a private sandbox's preview link of ``port`` carries."""
        return str(self._preview(port).token or "")

    def _preview(self, port: int) -> Any:
        links: dict[int, Any] = self.__dict__.setdefault("_links", {})
        if port not in links:
            links[port] = self.backend.call(f"get the preview link of port {port}", self.sdk.get_preview_link, port)
        return links[port]

    def __repr__(self) -> str:
        return f"<DaytonaSandbox {self.id} of {self.snapshot_of.short}>"

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
        tag = self._prepare(input)
        command = wrap(tag, argv, cwd or self.snapshot_of.workdir, timeout, self._max(max_output))
        start = time.perf_counter()

        def run() -> Any:
            return self.backend.call(
                "run a command",
                self.sdk.process.exec,
                command,
                env=dict(env) if env else None,
                timeout=_sdk_timeout(timeout),
            )

        def kill() -> None:
            self.backend.call("stop a command", self.sdk.process.exec, kill_command(tag), timeout=KILL_TIMEOUT)

        res = run() if cancel is None else wait_stoppable(run, timeout=None, cancel=cancel, kill=kill)[0]
        text = None if res is None else str(res.result or "")  # None: cancelled
        return self._result(argv, text, tag, start, timeout, max_output, on_line)

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
        """Through the SDK's ``AsyncDaytona``: the loop waits on the request, no thread does. A
        cancelled caller gets its ``CancelledError`` once the command's whole tree is killed."""
        self._check_open()
        clients = self.backend.async_clients
        tag = await offload(executor, self._prepare, input)
        command = wrap(tag, argv, cwd or self.snapshot_of.workdir, timeout, self._max(max_output))
        asb = await clients.sandbox(self.id)
        start = time.perf_counter()
        try:
            res = await clients.call(
                "run a command",
                asb.process.exec,
                command,
                env=dict(env) if env else None,
                timeout=_sdk_timeout(timeout),
            )
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the cancellation is what the caller hears of
                await unstoppable(
                    clients.call("stop a command", asb.process.exec, kill_command(tag), timeout=KILL_TIMEOUT)
                )
            raise
        return self._result(argv, str(res.result or ""), tag, start, timeout, max_output, None)

    def _prepare(self, input: bytes | str | None) -> str:
        """A new exec's tag, its stdin uploaded for the wrapper."""
        tag = new_id(6)
        if isinstance(input, str):
            input = input.encode()
        if input:
            self.fs.write(f"/tmp/.psb-{tag}.in", input, mode=0o600)
        return tag

    @staticmethod
    def _max(max_output: int | None) -> int:
        return DEFAULT_MAX_OUTPUT if max_output is None else max_output

    def _result(
        self,
        argv: Sequence[str],
        text: str | None,
        tag: str,
        start: float,
        timeout: float | None,
        max_output: int | None,
        on_line: LogCallback | None,
    ) -> ExecResult:
        """What the wrapper printed (None: the exec was cancelled and killed) as the exec's result."""
        code, timed_out, out, err = (137, False, b"", b"") if text is None else unwrap(tag, text, self.id)
        if on_line is not None:  # build steps: Daytona's exec returns output when the command ends
            for line in (out + err).decode("utf-8", errors="replace").splitlines():
                on_line(line)
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
        )

    @property
    def sdk_error(self) -> type[Exception]:
        """The SDK's error class (file operations translate it)."""
        err: type[Exception] = self.backend._sdk.DaytonaError
        return err

    def call(self, what: str, fn: Callable[..., _T], *args: Any, passthrough: tuple[type[Exception], ...]) -> _T:
        """An SDK call through the backend's retries and error translation."""
        return self.backend.call(what, fn, *args, passthrough=passthrough)

    @property
    def fs(self) -> DaytonaFS:
        """Files inside the sandbox (the same operations as the local engine's ``fs``)."""
        if self._fs is None:
            self._fs = DaytonaFS(self)
        return self._fs

    def interactive(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
        """Daytona's SDK gives no terminal: ``argv`` runs as one command with its output shown;
        without one, each line typed runs as a command in this sandbox until end of input."""
        if argv is not None:
            res = self.exec(argv, env=env)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            return res.exit_code
        print(f"sandbox {self.id} of {self.snapshot_of.short}: each line runs in it (no terminal); Ctrl-D ends it")
        code = 0
        while True:
            try:
                line = input(f"sandbox:{self.snapshot_of.short}# ")
            except EOFError:
                print()
                return code
            if line.strip():
                res = self.exec(line, env=env)
                sys.stdout.write(res.stdout)
                sys.stderr.write(res.stderr)
                code = res.exit_code

    def snapshot(self, name: str | None = None, *, live: bool = False) -> Snapshot:
        """Freeze the sandbox's files into a new Daytona snapshot; the sandbox keeps running.
        ``live=True`` raises :class:`EngineUnavailableError` (use :meth:`fork`)."""
        self._check_open()
        if live:
            raise refuse_live("daytona", "fork(live=True) is Daytona's own fork of the running sandbox")
        key = "x" + new_id(8)
        parent = self.snapshot_of
        self.backend.call("snapshot a sandbox", self.sdk.create_snapshot, remote_name(key), timeout=0)
        return self.backend._put(
            Snapshot(
                key=key,
                backend=self.backend.name,
                base={"snapshot": remote_name(key)},
                env=parent.env,
                workdir=parent.workdir,
                parent=parent.key,
                description=f"snapshot of sandbox {self.id}",
                name=name,
            )
        )

    def fork(self, *, live: bool = False) -> DaytonaSandbox:
        """A new sandbox from this one's current state: Daytona's copy-on-write fork, whatever
        ``live`` says (what it keeps of running processes is the Daytona service's)."""
        self._check_open()
        b = self.backend
        child = b.call("fork a sandbox", self.sdk.fork)
        labels = b.labels(**{f"{LABEL}.key": self.snapshot_of.key})
        if any(child.labels.get(k) != v for k, v in labels.items()):
            b.call("label a fork", child.set_labels, {**child.labels, **labels})
        return DaytonaSandbox(
            b, self.snapshot_of, network=self.network, env=self._extra_env, sdk_sandbox=child, limits=self._limits
        )

    def close(self) -> None:
        """Delete the sandbox and everything running in it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.backend.call("delete a sandbox", self.sdk.delete)
        with self.backend._lock:
            self.backend._live.discard(self)
        if "_async_clients" in self.backend.__dict__:
            self.backend.async_clients.forget(self.id)
