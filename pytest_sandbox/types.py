"""The contract every backend implements, and the only one: small Protocols plus the value types
they return. Everything above ``backends/`` (session, plugin, CLI, the Daytona endpoint) works
through these names alone.

Core module: imports only :mod:`.errors` (and :mod:`.image` for type hints).
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ExecError

if TYPE_CHECKING:
    from types import TracebackType

    from .image import Image

__all__ = [
    "DEFAULT_MAX_DOWNLOAD",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_READ",
    "Backend",
    "ExecResult",
    "FileInfo",
    "LogCallback",
    "Sandbox",
    "SandboxFS",
    "Snapshot",
    "Usage",
]

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

    @property
    def short(self) -> str:
        """The first 12 characters of the key, as shown in listings."""
        return self.key[:12]

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

    def interactive(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` (default: a login shell) on this process's terminal; return its exit code.
        A backend that gives no terminal runs ``argv``, or else each line typed, as one command."""
        ...

    def snapshot(self, name: str | None = None) -> Snapshot: ...
    def fork(self) -> Sandbox: ...
    def close(self) -> None: ...
    def __enter__(self) -> Sandbox: ...
    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Builds recipes into snapshots and forks sandboxes from them."""

    name: str

    def build(self, image: Image, *, on_log: LogCallback | None = None, rebuild: bool | float = False) -> Snapshot: ...

    def create(
        self,
        snapshot: Snapshot | Image | str,
        *,
        network: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Sandbox: ...

    def get_snapshot(self, key_or_name: str) -> Snapshot: ...
    def snapshots(self) -> Iterator[Snapshot]: ...
    def remove_snapshot(self, snapshot: Snapshot | str) -> None: ...
    def usage(self, snapshot: Snapshot) -> Usage:
        """What ``snapshot`` costs where this backend keeps it."""
        ...

    def location(self) -> str:
        """Where this backend keeps its snapshots, in words (a cache directory, an engine, a URL)."""
        ...

    def gc(self) -> int: ...
    def prune(self, older_than: float = 0.0) -> list[str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Backend: ...
    def __exit__(self, *exc: object) -> None: ...
