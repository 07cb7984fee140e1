"""Backends: each implements :class:`pytest_sandbox.api.Backend`. Imported lazily by name."""

from __future__ import annotations

from typing import Any

from ..api import Backend
from ..errors import ConfigError

__all__ = ["BACKENDS", "open_backend"]

BACKENDS = ("local", "docker", "daytona")


def open_backend(name: str = "local", **options: Any) -> Backend:
    """Open a backend by name: ``"local"`` (the embedded engine), ``"docker"`` or ``"daytona"``.

    Options go to the backend, e.g. ``cache_dir=`` for the local engine.
    """
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(**options)
    if name == "docker":
        from .docker import DockerBackend

        return DockerBackend(**options)
    if name == "daytona":
        from .daytona import DaytonaBackend

        return DaytonaBackend(**options)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
