"""Shared fixtures: one real local engine and one mmdebstrap-built Debian base per test session.

The cache lives beside pytest's basetemp, shared by xdist workers (so the Debian base is built
once per run, under the engine's own build lock). Set PYTEST_SANDBOX_TEST_CACHE to keep it
between runs while developing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_sandbox import Backend, EngineUnavailableError, Image, Snapshot
from pytest_sandbox.backends.local import LocalBackend

pytest_plugins = ["pytester"]

DEBIAN = Image.debian("bookworm", include=["python3", "python3-pip"])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PYTEST_SANDBOX_TEST_CACHE")
    if env:
        return Path(env)
    base = tmp_path_factory.getbasetemp()
    if base.name.startswith("popen-gw"):
        base = base.parent
    return base / "sandbox-cache"


@pytest.fixture(scope="session")
def backend(cache_dir: Path) -> Iterator[LocalBackend]:
    with LocalBackend(cache_dir) as b:
        yield b


@pytest.fixture(scope="session")
def debian(backend: LocalBackend) -> Snapshot:
    return backend.build(DEBIAN)


@pytest.fixture(scope="session")
def host(backend: LocalBackend) -> Snapshot:
    return backend.build(Image.host())


@pytest.fixture(params=["debian", "host"])
def base(request: pytest.FixtureRequest) -> Snapshot:
    """Each behavioural test runs on a real Debian rootfs and on the host base."""
    snap = request.getfixturevalue(request.param)
    assert isinstance(snap, Snapshot)
    return snap


@dataclass(frozen=True)
class Target:
    """A backend and a snapshot of it that behavioural tests run against."""

    backend: Backend
    snapshot: Snapshot


@pytest.fixture(scope="session")
def docker_backend(cache_dir: Path) -> Iterator[Backend]:
    try:
        from pytest_sandbox.backends.docker import DockerBackend

        b = DockerBackend(cache_dir)
    except EngineUnavailableError as exc:
        pytest.skip(f"docker backend unavailable here: {exc}")
    with b:
        yield b


@pytest.fixture(scope="session")
def docker_debian(docker_backend: Backend) -> Snapshot:
    return docker_backend.build(DEBIAN)


@pytest.fixture(params=["local-debian", "local-host", "docker-debian"])
def target(request: pytest.FixtureRequest) -> Target:
    """Every behavioural test runs on each backend, and on the local engine's two kinds of base."""
    backend_name, base = request.param.split("-")
    if backend_name == "local":
        return Target(request.getfixturevalue("backend"), request.getfixturevalue(base))
    return Target(request.getfixturevalue("docker_backend"), request.getfixturevalue("docker_debian"))


@pytest.fixture(params=["local", "docker"])
def debian_target(request: pytest.FixtureRequest) -> Target:
    """The Debian recipe's snapshot on each backend (for tests that need apt or python3)."""
    if request.param == "local":
        return Target(request.getfixturevalue("backend"), request.getfixturevalue("debian"))
    return Target(request.getfixturevalue("docker_backend"), request.getfixturevalue("docker_debian"))
