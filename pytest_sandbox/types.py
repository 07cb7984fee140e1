"""The contract every backend implements, and the only one: small Protocols plus the value types
they return. Everything above ``backends/`` (session, plugin, CLI, the Daytona endpoint) works
through these names alone.

Core module: imports only :mod:`.errors` (and :mod:`.image` for type hints).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .errors import ConfigError, ExecError, SandboxError
from .image import Service

if TYPE_CHECKING:
    from types import TracebackType

    from .image import Image

__all__ = [
    "DEFAULT_MAX_DOWNLOAD",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_READ",
    "Backend",
    "ExecResult",
    "DEFAULT_LIMITS",
    "DOCKER_REPOSITORY",
    "LABEL",
    "FileInfo",
    "LIMIT_NAMES",
    "LimitStatus",
    "Limits",
    "LogCallback",
    "Network",
    "Sandbox",
    "SandboxFS",
    "ServiceStatus",
    "Snapshot",
    "Usage",
]

LABEL = "pytest-sandbox"
"""The label every remote sandbox, container and image of this project carries (and the prefix
of the labels a snapshot image has: ``pytest-sandbox.parent``, ``.description``, ...)."""
DOCKER_REPOSITORY = "pytest-sandbox"
"""The repository a snapshot image has in a Docker engine: ``pytest-sandbox:<setup key>``."""

DEFAULT_MAX_OUTPUT = 16 << 20
"""Bytes of stdout, and of stderr, an exec keeps by default (16 MiB each); ``max_output=`` changes it."""
DEFAULT_MAX_READ = 256 << 20
"""The most ``fs.read()`` returns by default (256 MiB); ``max_size=`` raises it."""
DEFAULT_MAX_DOWNLOAD = 4 << 30
"""The most ``fs.download()`` writes by default (4 GiB, 4 KiB counted per entry); ``max_size=`` raises it."""

LogCallback = Callable[[str], None]
"""Receives one line of build progress or step output at a time (no trailing newline)."""


@dataclass(frozen=True)
class ExecResult:
    """What one command in a sandbox did.

    ``exit_code`` follows the shell's rules: a command killed by signal N gives ``128 + N``.
    """

    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    truncated: bool = False
    """True when the output was longer than ``max_output`` and the middle of it was left out."""
    oom_killed: bool = False
    """True when the command was killed because the sandbox reached its memory limit."""

    @property
    def ok(self) -> bool:
        """True when the command exited with code 0."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def output(self) -> str:
        """stdout followed by stderr."""
        return self.stdout + self.stderr

    def check(self) -> ExecResult:
        """Return ``self`` when the command succeeded, else raise :class:`ExecError` with its output."""
        if not self.ok:
            raise ExecError(self)
        return self


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, what: str = "size") -> int:
    """``536870912``, ``"512M"``, ``"2G"``, ``"1.5g"``, ``"100KiB"``: a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{what} takes a number of bytes or a size like '512M', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = value.strip().upper().removesuffix("IB").removesuffix("B") if value.strip() else ""
        unit = text[-1:] if text[-1:] in _UNITS else ""
        try:
            n = int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
        except (ValueError, OverflowError):  # "lots", "inf"
            raise ConfigError(f"{what} takes a size like '512M' or '2G', got {value!r}") from None
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return n


def format_bytes(n: int) -> str:
    """``536870912`` as ``512 MiB``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            q = n / size
            return f"{q:.0f} {unit}" if q == int(q) else f"{q:.1f} {unit}"
    return f"{n} B"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?\Z")


@dataclass(frozen=True)
class Network:
    """What a networked sandbox may reach: ``create(snapshot, network=Network(...))``.

    ``network=True`` is ``Network()``: the internet, not the host. Refused whatever the policy
    (unless an ``allow`` entry covers them): link-local addresses (``169.254.0.0/16`` and
    ``fe80::/10``, where cloud metadata services answer with credentials), the other metadata
    addresses, the host's own addresses on every interface, and the networks only the host reaches
    (those of its interfaces that carry no default route: ``docker0``, libvirt, a veth).

    ``allow``: when given, only these destinations, and DNS, are reachable. ``deny``: refused
    besides (``Network(deny=Network.PRIVATE)`` keeps a sandbox off every private network). Entries
    are CIDRs (``"10.0.0.0/8"``), addresses or host names (resolved on the host when the sandbox
    starts). ``deny`` is checked first, then ``allow``, then the refusals above, as E2B orders its
    ``deny_out`` and ``allow_out``. A plain list, ``network=["10.1.0.0/16"]``, is an allow-list.
    """

    allow: Sequence[str] = ()
    deny: Sequence[str] = ()

    PRIVATE: ClassVar[tuple[str, ...]] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
    """The private and shared address ranges (RFC 1918, RFC 6598, RFC 4193)."""

    def __post_init__(self) -> None:
        for name in ("allow", "deny"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ConfigError(f"Network({name}=...) takes a list of CIDRs or host names, got {value!r}")
            object.__setattr__(self, name, tuple(_destination(x, name) for x in value))

    @classmethod
    def of(cls, value: bool | Network | Sequence[str] | None) -> Network | None:
        """``create()``'s ``network=`` as a policy: None for no network (False), ``Network()`` for
        True, an allow-list for a list of destinations."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, Network):
            return value
        if isinstance(value, (list, tuple)):
            return cls(allow=tuple(value))
        raise ConfigError(
            f"network= takes True, False, a Network(allow=..., deny=...) or a list of CIDRs and host names, "
            f"got {value!r}"
        )


def _destination(entry: object, where: str) -> str:
    """A CIDR, address or host name, checked (it ends up in packet filter rules)."""
    if isinstance(entry, str):
        try:
            return str(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if _HOST_NAME.match(entry) and not entry.replace(".", "").isdigit():
                return entry.rstrip(".").lower()
    raise ConfigError(
        f"Network({where}=...): {entry!r} is not a CIDR (10.0.0.0/8), an address or a host name (pypi.example)"
    )


@dataclass(frozen=True)
class Limits:
    """What one sandbox may use: ``memory`` and ``disk`` in bytes (or sizes like ``"512M"``),
    ``pids`` processes and threads at once, ``cpus`` cores' worth of time. None: no limit of
    its own (the defaults, or the machine, apply)::

        Limits(memory="512M", pids=256, cpus=1.5, disk="2G")
    """

    memory: int | str | None = None
    pids: int | None = None
    cpus: float | None = None
    disk: int | str | None = None

    def __post_init__(self) -> None:
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_size(self.memory, "memory"))
        if self.disk is not None:
            object.__setattr__(self, "disk", parse_size(self.disk, "disk"))
        if self.pids is not None and (isinstance(self.pids, bool) or not isinstance(self.pids, int) or self.pids < 1):
            raise ConfigError(f"pids takes a positive whole number, got {self.pids!r}")
        if self.cpus is not None:
            if isinstance(self.cpus, bool) or not isinstance(self.cpus, (int, float)) or not 0 < self.cpus <= 4096:
                raise ConfigError(f"cpus takes a positive number of cores like 1.5, got {self.cpus!r}")
            object.__setattr__(self, "cpus", float(self.cpus))

    @property
    def memory_bytes(self) -> int | None:
        """``memory`` as a number of bytes."""
        return None if self.memory is None else int(self.memory)

    @property
    def disk_bytes(self) -> int | None:
        """``disk`` as a number of bytes."""
        return None if self.disk is None else int(self.disk)

    @classmethod
    def parse(cls, text: str) -> Limits:
        """``"memory=2G pids=4096"`` (spaces or commas between), as ``sandbox_limits`` and
        ``--sandbox-limits`` take them; ``none`` leaves that one unset (the default applies)."""
        values: dict[str, Any] = {}
        for item in text.replace(",", " ").split():
            name, sep, value = item.partition("=")
            if not sep or name not in LIMIT_NAMES:
                raise ConfigError(f"limits are written like 'memory=2G pids=4096 cpus=1.5 disk=10G', got {item!r}")
            if value.lower() == "none":
                values[name] = None
            elif name == "pids":
                try:
                    values[name] = int(value)
                except ValueError:
                    raise ConfigError(f"pids takes a whole number like 4096, got {value!r}") from None
            elif name == "cpus":
                try:
                    values[name] = float(value)
                except ValueError:
                    raise ConfigError(f"cpus takes a number of cores like 1.5, got {value!r}") from None
            else:
                values[name] = value
        return cls(**values)

    def over(self, base: Limits) -> Limits:
        """These limits where set, ``base``'s elsewhere."""
        return Limits(
            memory=self.memory if self.memory is not None else base.memory,
            pids=self.pids if self.pids is not None else base.pids,
            cpus=self.cpus if self.cpus is not None else base.cpus,
            disk=self.disk if self.disk is not None else base.disk,
        )

    def items(self) -> list[tuple[str, int | float]]:
        """The limits that are set, by name."""
        pairs: list[tuple[str, int | float | None]] = [
            ("memory", self.memory_bytes),
            ("pids", self.pids),
            ("cpus", self.cpus),
            ("disk", self.disk_bytes),
        ]
        return [(k, v) for k, v in pairs if v is not None]

    def describe(self) -> str:
        """Like ``memory=512 MiB pids=256``."""
        return " ".join(f"{k}={show_limit(k, v)}" for k, v in self.items()) or "none"


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
"""``memory``, ``pids``, ``cpus``, ``disk``: what markers and ``sandbox_limits`` may set."""


def show_limit(name: str, value: int | float) -> str:
    """One limit's value for people: sizes in MiB/GiB, cores as a number."""
    if name in ("memory", "disk"):
        return format_bytes(int(value))
    if name == "cpus":
        return f"{value:g}"
    return str(value)


def _default_memory() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return max(1 << 30, total // 2)


DEFAULT_LIMITS = Limits(memory=_default_memory(), pids=4096, disk=10 << 30)
"""What every sandbox gets unless told otherwise: half the machine's memory (at least 1 GiB), 4096
processes, 10 GiB of disk; CPU time is not limited (a spinner slows the others but takes nothing
down, and exec timeouts end it)."""


@dataclass(frozen=True)
class LimitStatus:
    """How one limit of a sandbox is held: ``how`` names the mechanism (``cgroup v1 memory``,
    ``rlimit RLIMIT_AS``, ...), or says why it is not enforced here."""

    name: str
    value: int | float
    enforced: bool
    how: str

    def __str__(self) -> str:
        state = self.how if self.enforced else f"NOT enforced: {self.how}"
        return f"{self.name}={show_limit(self.name, self.value)} ({state})"


@dataclass(frozen=True)
class ServiceStatus:
    """One service of a sandbox: ``state`` is ``ready``, ``not ready`` (its check fails now) or
    ``stopped``; ``log`` is the tail of its output."""

    name: str
    state: str
    log: str = ""


@dataclass(frozen=True)
class Snapshot:
    """An immutable, frozen sandbox state that new sandboxes start from.

    ``key`` is the recipe's setup key for built snapshots, or a generated id for snapshots taken
    from a running sandbox. ``parent`` is the key of the snapshot it was derived from.
    """

    key: str
    backend: str
    layers: tuple[str, ...] = ()
    base: Mapping[str, Any] = field(default_factory=dict)
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    parent: str | None = None
    created: float = field(default_factory=time.time)
    description: str = ""
    name: str | None = None
    owner: str | None = None
    services: tuple[Service, ...] = ()
    """The servers every sandbox of this snapshot starts, in recipe order."""
    process: Mapping[str, Any] | None = None
    """What a restore of a live snapshot's processes needs (the engine's), or None."""

    @property
    def live(self) -> bool:
        """True for a live snapshot: it holds running processes, memory included, besides files."""
        return self.process is not None

    @property
    def short(self) -> str:
        """The first 12 characters of the key, as shown in listings."""
        return self.key[:12]

    def lineage(self, get: Callable[[str], Snapshot | None]) -> list[Snapshot]:
        """This snapshot and the ancestors ``get`` still finds by key, oldest first. A chain that
        comes back to a key it passed (a damaged or forged record) is a :class:`SandboxError`."""
        out = [self]
        seen = {self.key}
        while out[-1].parent:
            parent = get(out[-1].parent)
            if parent is None:
                break
            if parent.key in seen:
                raise SandboxError(
                    f"snapshot {self.short}'s ancestry loops back to {parent.short} (a damaged or forged record): "
                    f"remove it with `pytest-sandbox rm {self.short}`"
                )
            seen.add(parent.key)
            out.append(parent)
        return out[::-1]

    @property
    def environment(self) -> dict[str, str]:
        """The environment variables every command in a sandbox of this snapshot starts with."""
        return dict(self.env)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "backend": self.backend,
            "layers": list(self.layers),
            "base": dict(self.base),
            "env": [list(p) for p in self.env],
            "workdir": self.workdir,
            "parent": self.parent,
            "created": self.created,
            "description": self.description,
            "name": self.name,
            "owner": self.owner,
            "services": [x.to_json() for x in self.services],
            **({"process": dict(self.process)} if self.process is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(
            key=data["key"],
            backend=data["backend"],
            layers=tuple(data.get("layers", ())),
            base=dict(data.get("base", {})),
            env=tuple((k, v) for k, v in data.get("env", ())),
            workdir=data.get("workdir", "/"),
            parent=data.get("parent"),
            created=float(data.get("created", 0.0)),
            description=data.get("description", ""),
            name=data.get("name"),
            owner=data.get("owner"),
            services=tuple(Service.from_json(x) for x in data.get("services", ())),
            process=dict(data["process"]) if isinstance(data.get("process"), dict) else None,
        )


@dataclass(frozen=True)
class FileInfo:
    """What :meth:`SandboxFS.stat` tells of one path. Owners are ids as the sandbox sees them
    (0 is the sandbox's root). The names match :class:`os.stat_result`'s."""

    st_mode: int
    st_size: int
    st_mtime: float
    st_uid: int = 0
    st_gid: int = 0

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.st_mode)


@dataclass(frozen=True)
class Usage:
    """What a snapshot costs where it is stored: ``size`` bytes of its own (top) layer and when a
    sandbox last started from it; None where the backend cannot tell."""

    size: int | None = None
    last_used: float | None = None


@runtime_checkable
class SandboxFS(Protocol):
    """Files inside a sandbox. Paths are sandbox paths; nothing here can reach a host file."""

    def read(self, path: str, max_size: int = DEFAULT_MAX_READ) -> bytes: ...
    def read_text(self, path: str, max_size: int = DEFAULT_MAX_READ) -> str: ...
    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None: ...
    def upload(self, local: str | Path, path: str) -> None: ...
    def download(self, path: str, local: str | Path, max_size: int = DEFAULT_MAX_DOWNLOAD) -> None: ...
    def listdir(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def is_dir(self, path: str) -> bool: ...
    def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None: ...
    def stat(self, path: str, follow_symlinks: bool = True) -> FileInfo: ...
    def remove(self, path: str, recursive: bool = False) -> None: ...


@runtime_checkable
class Sandbox(Protocol):
    """A running, isolated environment forked from a snapshot. Close it (or use ``with``)."""

    id: str
    snapshot_of: Snapshot
    history: list[ExecResult]

    @property
    def fs(self) -> SandboxFS: ...

    @property
    def limits(self) -> dict[str, LimitStatus]:
        """Each limit of this sandbox and how it is held here (or why it is not)."""
        ...

    def exec(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult: ...

    @property
    def services(self) -> dict[str, ServiceStatus]:
        """Each service of this sandbox's snapshot: ``ready``, ``not ready`` or ``stopped``, and its log."""
        ...

    def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """A ``(host, port)`` that reaches ``port`` on the sandbox's loopback, open until the
        sandbox closes: on this machine's loopback for ``tcp`` (any protocol over TCP); a backend
        that forwards only HTTP (Daytona's preview links) takes ``protocol="http"``."""
        ...

    def interactive(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` (default: a login shell) on this process's terminal; return its exit code.
        A backend that gives no terminal runs ``argv``, or else each line typed, as one command."""
        ...

    def snapshot(self, name: str | None = None, *, live: bool = False) -> Snapshot:
        """Freeze its files into a new snapshot; ``live=True`` keeps its running processes too,
        memory included, where the backend can (the local engine as root, with CRIU 4.2)."""
        ...

    def fork(self, *, live: bool = False) -> Sandbox:
        """A new sandbox from its current state; ``live=True`` continues its processes there."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Sandbox: ...
    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Builds recipes into snapshots and forks sandboxes from them."""

    name: str

    def build(
        self,
        image: Image,
        *,
        on_log: LogCallback | None = None,
        rebuild: bool | float = False,
        cache_from: str | None = None,
    ) -> Snapshot:
        """The snapshot of ``image``, built once per setup key. ``cache_from`` is a registry
        repository of pushed snapshots: the deepest step of the recipe found there is pulled,
        and only the steps after it are built."""
        ...

    def push(self, snapshot: Snapshot | str, repository: str, *, on_log: LogCallback | None = None) -> str:
        """Push ``snapshot`` (and its parents) to ``repository``, tagged by key; returns the
        reference of ``snapshot``'s image (``REPOSITORY:KEY``)."""
        ...

    def pull(self, reference: str, *, on_log: LogCallback | None = None) -> Snapshot:
        """The snapshot pushed at ``reference`` (``REPOSITORY:KEY``), under its key."""
        ...

    def create(
        self,
        snapshot: Snapshot | Image | str,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> Sandbox:
        """A new sandbox forked from ``snapshot``. ``network``: False (loopback only), True (a
        network of its own: the internet, not the host), or a :class:`Network` policy (a list of
        destinations is an allow-list)."""
        ...

    def get_snapshot(self, key_or_name: str) -> Snapshot: ...
    def snapshots(self) -> Iterator[Snapshot]: ...
    def remove_snapshot(self, snapshot: Snapshot | str) -> None: ...
    def usage(self, snapshot: Snapshot) -> Usage:
        """What ``snapshot`` costs where this backend keeps it."""
        ...

    def location(self) -> str:
        """Where this backend keeps its snapshots, in words (a cache directory, an engine, a URL)."""
        ...

    def gc(self, *, wait: bool = True) -> int: ...
    def prune(self, older_than: float = 0.0) -> list[str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Backend: ...
    def __exit__(self, *exc: object) -> None: ...
