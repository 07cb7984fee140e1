"""Shared fixtures: one real local engine and one mmdebstrap-built Debian base per test session.

The cache lives beside pytest's basetemp, shared by xdist workers (so the Debian base is built
once per run, under the engine's own build lock). Set PYTEST_SANDBOX_TEST_CACHE to keep it
between runs while developing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_sandbox import Backend, EngineUnavailableError, Image, SandboxError, Snapshot
from pytest_sandbox.backends.local import LocalBackend

pytest_plugins = ["pytester"]


def run_py(code: str, cache_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh process against the same cache (a second 'session')."""
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, capture_output=True, timeout=timeout
    )


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; whether it held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


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


MISSING = "is not installed ("
"""What the skip reason of every test that needs an optional tool says, before the way to get it.
With PYTEST_SANDBOX_REQUIRE_TOOLS=1 (CI) such a skip fails instead: CI runs everything."""


def needs_tool(tool: str, install: str) -> None:
    """Skip the test, naming the package, when ``tool`` is not on PATH."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} {MISSING}{install})")


def needs_debian(backend: Backend, image: Image = DEBIAN) -> None:
    """A Debian base is made with mmdebstrap, unless this backend has it already."""
    with contextlib.suppress(SandboxError):
        if backend.get_snapshot(image.prefix_keys()[0]) is not None:
            return
    needs_tool("mmdebstrap", "apt-get install mmdebstrap")


def needs_network(backend: Backend) -> None:
    """Skip unless networked sandboxes get a network of their own here (naming what is missing):
    the local engine never gives one the host's."""
    if not isinstance(backend, LocalBackend):
        return
    uplinks = backend.host.uplinks
    if uplinks.slirp is None:
        needs_tool("slirp4netns", "apt-get install slirp4netns")
    if not uplinks.usable:
        pytest.skip(uplinks.reason)


@pytest.fixture
def mmdebstrap() -> None:
    """For tests that build a Debian base of their own (in a fresh cache or a subprocess)."""
    needs_tool("mmdebstrap", "apt-get install mmdebstrap")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("PYTEST_SANDBOX_REQUIRE_TOOLS") == "1":
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if MISSING in reason or "backend unavailable" in reason or "no Daytona endpoint" in reason:
            report.outcome = "failed"
            report.longrepr = f"a tool CI must have is missing: {reason}"


@pytest.fixture(scope="session")
def debian(backend: LocalBackend) -> Snapshot:
    needs_debian(backend)
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
    needs_debian(docker_backend)
    return docker_backend.build(DEBIAN)


@pytest.fixture(params=["local-debian", "local-host", "docker-debian", "daytona-debian"])
def target(request: pytest.FixtureRequest) -> Target:
    """Every behavioural test runs on each backend, and on the local engine's two kinds of base."""
    backend_name, base = request.param.split("-")
    if backend_name == "local":
        return Target(request.getfixturevalue("backend"), request.getfixturevalue(base))
    return Target(request.getfixturevalue(f"{backend_name}_backend"), request.getfixturevalue(f"{backend_name}_debian"))


@pytest.fixture(params=["local", "docker", "daytona"])
def debian_target(request: pytest.FixtureRequest) -> Target:
    """The Debian recipe's snapshot on each backend (for tests that need apt or python3)."""
    if request.param == "local":
        return Target(request.getfixturevalue("backend"), request.getfixturevalue("debian"))
    return Target(
        request.getfixturevalue(f"{request.param}_backend"), request.getfixturevalue(f"{request.param}_debian")
    )


# -- the daytona backend, against the Daytona-compatible endpoint on localhost -----------------
def _test_cache(config: pytest.Config) -> Path:
    env = os.environ.get("PYTEST_SANDBOX_TEST_CACHE")
    if env:
        return Path(env)
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return (base.parent if base.name.startswith("popen-gw") else base) / "sandbox-cache"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """One endpoint per run, started by the controller before xdist workers inherit its address.

    A DAYTONA_API_URL set by the caller wins: then the daytona cases run against that Daytona.
    """
    config.addinivalue_line("markers", "endpoint_args(*args): options for a test's own Daytona endpoint")
    if hasattr(config, "workerinput") or os.environ.get("DAYTONA_API_URL"):
        return
    try:
        import daytona_api_client  # noqa: F401
    except ImportError:
        return
    argv = [sys.executable, "-m", "pytest_sandbox.cli", "--cache-dir", str(_test_cache(config))]
    argv += ["serve", "--daytona", "--port", "0", "--until-stdin-closes", "--api-key", "local-tests"]
    log = _test_cache(config) / "daytona-endpoint.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("DAYTONA_API_URL="):
        proc.kill()
        return
    os.environ["DAYTONA_API_URL"] = line.split("=", 1)[1]
    os.environ["DAYTONA_API_KEY"] = "local-tests"
    config.stash[_ENDPOINT] = proc


_ENDPOINT = pytest.StashKey["subprocess.Popen[str]"]()


def pytest_unconfigure(config: pytest.Config) -> None:
    proc = config.stash.get(_ENDPOINT, None)
    if proc is not None:
        assert proc.stdin is not None
        proc.stdin.close()  # the endpoint deletes its sandboxes and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for var in ("DAYTONA_API_URL", "DAYTONA_API_KEY"):
            os.environ.pop(var, None)


@pytest.fixture(scope="session")
def daytona_backend(cache_dir: Path) -> Iterator[Backend]:
    if not os.environ.get("DAYTONA_API_URL"):
        pytest.skip("no Daytona endpoint: the daytona SDK is not installed (pip install 'pytest-sandbox[daytona]')")
    from pytest_sandbox.backends.daytona import DaytonaBackend

    with DaytonaBackend(cache_dir) as b:
        yield b


@pytest.fixture(scope="session")
def daytona_debian(daytona_backend: Backend) -> Snapshot:
    needs_debian(daytona_backend)  # the endpoint's local engine makes it
    return daytona_backend.build(DEBIAN)


# -- a real registry on 127.0.0.1 ------------------------------------------------------------
def start_registry(root: Path, auth: str = "", storage: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """Debian's docker-registry (the CNCF distribution registry) serving ``root`` on a free port;
    ``auth`` and ``storage`` are more YAML for its config's top level and its storage section."""
    needs_tool("docker-registry", "apt-get install docker-registry")
    binary = shutil.which("docker-registry")
    assert binary is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n  delete:\n    enabled: true\n"
        f"{storage}"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    proc = subprocess.Popen(
        [binary, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 with auth on)
        except OSError:
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry on 127.0.0.1 for the whole run: its host:port."""
    proc, addr = start_registry(tmp_path_factory.mktemp("registry"))
    yield addr
    proc.kill()
    proc.wait()
