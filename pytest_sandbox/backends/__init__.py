"""Backends: each implements the :class:`~pytest_sandbox.types.Backend` protocol. This module is
the only place that knows them by name; each is imported lazily, when it is opened."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError, EngineUnavailableError
from ..types import Backend

__all__ = ["describe_backend", "BACKENDS", "open_backend", "resolve_backend"]

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


def resolve_backend(name: str) -> str:
    """``auto``: local where it works, else docker where an engine answers, else daytona where
    credentials are set; otherwise an error saying what to install."""
    if name != "auto":
        return name
    from ..engine.host import preflight

    try:
        preflight()
        return "local"
    except EngineUnavailableError as local_err:
        reason = str(local_err)
    if os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock"):
        return "docker"
    if os.environ.get("DAYTONA_API_KEY"):
        return "daytona"
    raise EngineUnavailableError(
        f"no sandbox backend works here. The local engine says: {reason} "
        "Alternatively run a Docker engine (pip install 'pytest-sandbox[docker]') or set "
        "DAYTONA_API_KEY (pip install 'pytest-sandbox[daytona]')."
    )


def describe_backend(name: str) -> str:
    """A line on what ``name`` would run on, without opening it (for pytest's report header)."""
    if name == "local":
        import subprocess

        from ..engine.host import find_bwrap

        who = "as root (sandboxes in an unprivileged id range)" if os.geteuid() == 0 else "rootless"
        try:
            out = subprocess.run([find_bwrap(), "--version"], capture_output=True, text=True, timeout=10)
            bwrap = out.stdout.strip() or "bwrap (version unknown)"
        except (EngineUnavailableError, OSError, subprocess.SubprocessError) as exc:
            bwrap = f"no bwrap: {exc}"
        return f"local engine, {who}, {bwrap}"
    if name == "docker":
        return f"docker at {os.environ.get('DOCKER_HOST') or 'unix:///var/run/docker.sock'}"
    if name == "daytona":
        return f"daytona at {os.environ.get('DAYTONA_API_URL') or 'the SDK default API'}"
    return name
