"""The endpoint's records of snapshots and sandboxes, what clients ask for, and the error they hear."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from ..types import Network, Sandbox

__all__ = ["API", "DAEMON", "ApiError", "FileStat", "SandboxRecord", "SandboxSpec", "SnapshotRecord"]

API = "DAYTONA_API"
"""The ``source`` of errors Daytona's REST API answers."""
DAEMON = "DAYTONA_DAEMON"
"""The ``source`` of errors the daemon in a sandbox (the toolbox) answers."""


class ApiError(Exception):
    """A failure the client is told about: the HTTP status, the message, Daytona's error code
    (``FILE_NOT_FOUND``...) and which side of Daytona answers it (:data:`API` or :data:`DAEMON`)."""

    def __init__(self, status: int, message: str, code: str | None = None, source: str = API) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.source = status, message, code, source


@dataclass
class SnapshotRecord:
    """A Daytona snapshot: a name for a backend snapshot (``key``), built here or taken of a sandbox."""

    id: str
    name: str
    image_name: str
    state: str = "pending"
    key: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    error: str | None = None
    source_sandbox_id: str | None = None
    cpu: int = 1
    """Cores, GiB of memory and GiB of disk of the sandboxes made from it (Daytona's defaults)."""
    memory: int = 1
    disk: int = 10
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The row of the state file (build logs are not kept)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "logs"}

    @classmethod
    def from_json(cls, row: object) -> SnapshotRecord | None:
        """The record of a state-file row; None for a row that is not one (a damaged file, or
        another version's), which is skipped rather than fatal."""
        if not isinstance(row, dict):
            return None
        known = {f.name for f in fields(cls)} - {"logs"}
        try:
            rec = cls(**{k: v for k, v in row.items() if k in known})
        except TypeError:
            return None
        texts = (rec.id, rec.name, rec.image_name, rec.state)
        if not all(isinstance(t, str) for t in texts) or not isinstance(rec.key, (str, type(None))):
            return None
        return rec


@dataclass(frozen=True)
class SandboxSpec:
    """What a client asks of a new sandbox. ``dockerfile``: build this image first (the sandbox
    is ``pending_build`` meanwhile); else ``snapshot``, else the endpoint's default image."""

    name: str | None = None
    snapshot: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    network_block_all: bool = False
    network_allow_list: str | None = None
    """Daytona's comma-separated CIDRs (and ``domain_allow_list``'s names): the sandbox's allow-list."""
    domain_allow_list: str | None = None
    target: str | None = None
    auto_stop: int | None = None
    auto_delete: int | None = None
    dockerfile: str | None = None
    cpu: int | None = None
    memory: int | None = None
    disk: int | None = None


@dataclass
class SandboxRecord:
    """A Daytona sandbox: its settings, its state, and the backend's sandbox while it is started.

    ``lock`` serialises what changes ``sb`` (start, stop, fork, snapshot, delete).
    """

    id: str
    name: str
    snapshot: str | None
    labels: dict[str, str]
    env: dict[str, str]
    user: str
    network_block_all: bool
    target: str
    auto_stop: int
    auto_delete: int
    cpu: int = 1
    """Cores, GiB of memory and GiB of disk, as Daytona sizes a sandbox (its defaults here)."""
    memory: int = 1
    disk: int = 10
    network_allow_list: str | None = None
    domain_allow_list: str | None = None
    sb: Sandbox | None = None
    state: str = "creating"
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    activity: float = field(default_factory=time.time)
    stopped_key: str | None = None
    shell: str | None = None
    logs: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def network(self) -> Network | None:
        """The network its sandbox gets: none when blocked, else the allow-list (if any) as a
        policy of the local engine's (the internet, not the endpoint's machine, by default)."""
        if self.network_block_all:
            return None
        return network_policy(self.network_allow_list, self.domain_allow_list)


def network_policy(cidrs: str | None, domains: str | None) -> Network:
    """Daytona's allow-lists (comma-separated) as a :class:`Network`; a bad entry is a ConfigError."""
    entries = [x.strip() for text in (cidrs, domains) if text for x in text.split(",") if x.strip()]
    return Network(allow=tuple(entries))


@dataclass(frozen=True)
class FileStat:
    """What the toolbox tells of a file. ``uid``/``gid`` are ids inside the sandbox (0: root)."""

    name: str
    mode: int
    size: int
    mtime: float
    uid: int
    gid: int
