"""pytest-sandbox: every test gets its own real, isolated Linux environment, forked in
milliseconds from a snapshot that is built once per recipe.

The public API is what ``__all__`` lists, and the async API in :mod:`pytest_sandbox.aio`;
everything else is private.
"""

from __future__ import annotations

from .backends import open_backend
from .errors import (
    ConfigError,
    EngineUnavailableError,
    ExecError,
    ExecTimeoutError,
    LimitWarning,
    RegistryError,
    SandboxClosedError,
    SandboxError,
    SandboxFileError,
    ServiceError,
    SnapshotBuildError,
    SnapshotError,
    SnapshotNotFoundError,
)
from .image import Image, Service
from .types import (
    Backend,
    ExecResult,
    FileInfo,
    Limits,
    LimitStatus,
    Network,
    Sandbox,
    SandboxFS,
    ServiceStatus,
    Snapshot,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ConfigError",
    "EngineUnavailableError",
    "ExecError",
    "ExecResult",
    "ExecTimeoutError",
    "FileInfo",
    "Image",
    "LimitStatus",
    "LimitWarning",
    "Limits",
    "Network",
    "RegistryError",
    "Sandbox",
    "SandboxClosedError",
    "SnapshotError",
    "SandboxError",
    "SandboxFS",
    "SandboxFileError",
    "Service",
    "ServiceError",
    "ServiceStatus",
    "Snapshot",
    "SnapshotBuildError",
    "SnapshotNotFoundError",
    "Usage",
    "open_backend",
]
