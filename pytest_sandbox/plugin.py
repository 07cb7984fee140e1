"""The pytest plugin: options, the ``sandbox`` marker and fixtures. Thin by design: the work is
done by :class:`pytest_sandbox.session.SessionManager` and the backends.

Fixtures (``pytest --fixtures`` shows their docs): ``sandbox_backend``, ``sandbox_image``,
``sandbox_images``, ``sandbox_snapshot``, ``sandbox``, ``worker_sandbox``, ``sandbox_factory``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any

import pytest

from ._relay import Relay, append_line
from .errors import ConfigError, SandboxError, tail
from .image import Image, env_items, is_image_ref
from .session import KEEP_CHOICES, SessionManager
from .types import LIMIT_NAMES, Backend, ExecResult, Limits, LimitStatus, Network, Sandbox, Snapshot, show_limit

BACKEND_CHOICES = ("auto", "local", "docker", "daytona")
MARKER_DOC = (
    "sandbox(image=None, network=False, env=None, memory=None, pids=None, cpus=None, disk=None): "
    "the sandbox for this test (class, module) is forked from `image`: an Image, a name from the "
    "sandbox_images fixture, or a base reference ('host', 'debian:bookworm', 'rootfs:/path', "
    "'python:3.12-slim'); network=True gives it a network of its own (the internet, not the host; a "
    "Network(allow=..., deny=...) or a list of CIDRs and hosts narrows it); env adds environment "
    "variables; memory, pids, cpus and disk are its limits (e.g. memory='1G', pids=512)."
)
MARKER_ARGS = ("image", "network", "env", *LIMIT_NAMES)

manager_key = pytest.StashKey[SessionManager]()
keep_key = pytest.StashKey[str]()
used_key = pytest.StashKey[list[tuple[str, Sandbox, int]]]()
reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()
worker_sb_key = pytest.StashKey[Sandbox]()
kept_key = pytest.StashKey[list[dict[str, str]]]()
relay_key = pytest.StashKey[Relay]()


# -- options ------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "pytest-sandbox: a real, isolated environment per test")
    group.addoption(
        "--sandbox-backend",
        default=None,
        help="auto (default: local where it works, else docker, else daytona), local, "
        "docker or daytona. ini: sandbox_backend",
    )
    group.addoption(
        "--sandbox-cache-dir",
        default=None,
        help="snapshot cache (default $PYTEST_SANDBOX_CACHE or ~/.cache/pytest-sandbox). ini: sandbox_cache_dir",
    )
    group.addoption(
        "--sandbox-rebuild",
        action="store_true",
        default=None,
        help="ignore cached snapshots of this run's setup keys (each still built once). ini: sandbox_rebuild",
    )
    group.addoption(
        "--sandbox-keep",
        default=None,
        help="never (default), failed or always: keep those tests' sandboxes as "
        "snapshots and print the command that opens a shell in each. ini: sandbox_keep",
    )
    group.addoption(
        "--sandbox-limits",
        default=None,
        help="every sandbox's limits, e.g. 'memory=2G pids=4096 cpus=2 disk=10G' (default: memory half "
        "the RAM, pids=4096, disk=10G). ini: sandbox_limits",
    )
    group.addoption(
        "--sandbox-max-memory",
        default=None,
        metavar="SIZE",
        help="cap the memory of all sandboxes of this run together (every xdist worker's), e.g. 8G "
        "(local engine; default: no cap of its own, the job's cgroup still holds them). ini: sandbox_max_memory",
    )
    group.addoption(
        "--sandbox-cache-from",
        default=None,
        metavar="REPOSITORY",
        help="a registry repository of pushed snapshots (e.g. registry.example/team/env): pull the deepest "
        "step of each recipe found there instead of building it. ini: sandbox_cache_from",
    )
    group.addoption(
        "--sandbox-cache-to",
        default=None,
        metavar="REPOSITORY",
        help="push every snapshot this run builds to that registry repository, tagged by key. ini: sandbox_cache_to",
    )
    parser.addini("sandbox_backend", "default for --sandbox-backend", default="auto")
    parser.addini("sandbox_cache_from", "default for --sandbox-cache-from", default="")
    parser.addini("sandbox_cache_to", "default for --sandbox-cache-to", default="")
    parser.addini("sandbox_limits", "default for --sandbox-limits", default="")
    parser.addini("sandbox_max_memory", "default for --sandbox-max-memory", default="")
    parser.addini("sandbox_cache_dir", "default for --sandbox-cache-dir", default="")
    parser.addini("sandbox_rebuild", "default for --sandbox-rebuild", type="bool", default=False)
    parser.addini("sandbox_keep", "default for --sandbox-keep", default="never")


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"sandbox_{name}")
    return config.getini(f"sandbox_{name}") if value is None else value


def _log(config: pytest.Config) -> Callable[[str], None]:
    def log(line: str) -> None:
        # Builds happen inside fixtures, while pytest captures output: step past the capture.
        capman = config.pluginmanager.get_plugin("capturemanager")
        ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
        with ctx:
            tr = config.pluginmanager.get_plugin("terminalreporter")
            relay = getattr(config, "workerinput", {}).get("sandbox_progress")
            if relay:  # an xdist worker: the controller's terminal reporter shows it
                append_line(relay, line)
            elif tr is not None and not hasattr(config, "workerinput"):
                tr.ensure_newline()
                tr.write_line(line)
            else:
                print(line, file=sys.stderr, flush=True)

    return log


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    backend = str(_option(config, "backend"))
    if backend not in BACKEND_CHOICES:
        raise pytest.UsageError(f"--sandbox-backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    keep = str(_option(config, "keep"))
    if keep not in KEEP_CHOICES:
        raise pytest.UsageError(f"--sandbox-keep must be one of {', '.join(KEEP_CHOICES)}, got {keep!r}")
    try:
        limits = Limits.parse(str(_option(config, "limits") or ""))
    except ConfigError as exc:
        raise pytest.UsageError(f"--sandbox-limits / sandbox_limits: {exc}") from None
    try:
        max_memory = Limits(memory=str(_option(config, "max_memory") or "") or None).memory_bytes
    except ConfigError as exc:
        raise pytest.UsageError(f"--sandbox-max-memory / sandbox_max_memory: {exc}") from None
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "sandbox_run_id" in workerinput:
        run_id, run_start = workerinput["sandbox_run_id"], float(workerinput["sandbox_run_start"])
    else:
        run_id, run_start = uuid.uuid4().hex, time.time()
    config.stash[keep_key] = keep
    config.stash[kept_key] = []
    config.stash[manager_key] = SessionManager(
        backend=backend,
        cache_dir=str(_option(config, "cache_dir") or "") or None,
        rebuild=bool(_option(config, "rebuild")),
        limits=limits,
        max_memory=max_memory,
        run_id=run_id,
        run_start=run_start,
        log=_log(config),
        cache_from=str(_option(config, "cache_from") or "") or None,
        cache_to=str(_option(config, "cache_to") or "") or None,
        verbosity=config.get_verbosity(),
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The backend this run uses (and how: rootless or not, bwrap's version), the cache, the shared cache."""
    return config.stash[manager_key].header()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker of this run shares one run id and start time."""
    mgr = node.config.stash[manager_key]
    node.workerinput["sandbox_run_id"] = mgr.run_id
    node.workerinput["sandbox_run_start"] = mgr.run_start
    config = node.config
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        if relay_key not in config.stash:
            relay = config.stash[relay_key] = Relay(tr)
            config.pluginmanager.register(_ProgressRelay(relay), "sandbox-progress-relay")
            config.add_cleanup(relay.close)
        node.workerinput["sandbox_progress"] = config.stash[relay_key].path


class _ProgressRelay:
    """xdist controller: the workers' build progress, through this terminal reporter."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.relay.flush()  # before the report's own dot or line

    @pytest.hookimpl(tryfirst=True)
    def pytest_terminal_summary(self) -> None:
        self.relay.close()  # the last lines before the summary that counts the builds


def _validate_marker(item: pytest.Item) -> None:
    for mark in item.iter_markers("sandbox"):
        where = f"@pytest.mark.sandbox on {item.nodeid}"
        if mark.args:
            raise pytest.UsageError(f"{where}: takes keyword arguments only ({', '.join(MARKER_ARGS)})")
        unknown = set(mark.kwargs) - set(MARKER_ARGS)
        if unknown:
            raise pytest.UsageError(
                f"{where}: unknown argument(s) {', '.join(sorted(unknown))}; use {'=, '.join(MARKER_ARGS)}="
            )
        try:
            _marker_limits(mark.kwargs)
        except ConfigError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
        image = mark.kwargs.get("image")
        if image is not None and not isinstance(image, (Image, str)):
            raise pytest.UsageError(
                f"{where}: image= must be an Image, an image name or a base reference, got {type(image).__name__}"
            )
        try:
            Network.of(mark.kwargs.get("network", False))
        except ConfigError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
        env = mark.kwargs.get("env", {})
        if not isinstance(env, Mapping) or not all(isinstance(k, str) for k in env):
            raise pytest.UsageError(f"{where}: env= must be a dict of names to values")
        try:
            env_items(env)
        except ConfigError as exc:
            raise pytest.UsageError(f"{where}: env= {exc}") from None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        _validate_marker(item)


def _marker_limits(kwargs: Mapping[str, Any]) -> Limits | None:
    given = {k: kwargs[k] for k in LIMIT_NAMES if kwargs.get(k) is not None}
    return Limits(**given) if given else None


# -- reporting ----------------------------------------------------------------------------------
def _describe(result: ExecResult, limits: Mapping[str, LimitStatus]) -> str:
    why = " (timed out)" if result.timed_out else ""
    if result.oom_killed:
        mem = limits.get("memory")
        why = " (killed: out of memory" + (f", limit {show_limit('memory', mem.value)})" if mem else ")")
    line = f"$ {result.command}\n  -> exit {result.exit_code}{why} in {result.duration * 1000:.1f} ms"
    out = tail(result.output, 10)
    return line + ("\n" + "\n".join("  | " + x for x in out.splitlines()) if out else "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    item.stash.setdefault(reports_key, {})[rep.when] = rep
    used = item.stash.get(used_key, [])
    if rep.failed and used:
        parts = []
        for label, sb, start in used:
            execs = sb.history[start:]
            snap = sb.snapshot_of
            head = f"{label}: sandbox {sb.id} from snapshot {snap.short} ({len(execs)} execs)"
            limits = _limits_of(sb)
            shown = "limits: " + ", ".join(str(s) for s in limits.values()) if limits else ""
            lines = [head, *([shown] if shown else []), *_describe_services(sb)]
            parts.append("\n".join([*lines, *(_describe(r, limits) for r in execs)]))
        rep.sections.append(("sandbox", "\n\n".join(parts)))
    return rep


def _describe_services(sb: Sandbox) -> list[str]:
    """Each service's state and the tail of its output, for a failing test's sandbox section."""
    if not sb.snapshot_of.services:
        return []
    try:
        states = sb.services
    except Exception as exc:  # a closed or broken sandbox still gets its report
        return [f"services: unknown ({exc})"]
    out = ["services: " + ", ".join(f"{s.name} {s.state}" for s in states.values())]
    for s in states.values():
        log = tail(s.log, 10)
        if log:
            out += [f"  {s.name} output:", *("  | " + x for x in log.splitlines())]
    return out


def _limits_of(sb: Sandbox) -> dict[str, LimitStatus]:
    try:
        return sb.limits
    except Exception:  # a closed or broken sandbox still gets its report
        return {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    wsb = item.config.stash.get(worker_sb_key, None)
    item.stash[used_key] = [] if wsb is None else [("worker_sandbox", wsb, len(wsb.history))]


def _finish(request: pytest.FixtureRequest, sb: Sandbox, label: str) -> None:
    """Close a test's sandbox, first freezing it when the keep policy says so."""
    config = request.config
    policy = config.stash[keep_key]
    reports = request.node.stash.get(reports_key, {})
    failed = any(r.failed for r in reports.values())
    try:
        if policy == "always" or (policy == "failed" and failed):
            snap = config.stash[manager_key].keep(sb, label)
            config.stash[kept_key].append({"test": label, "key": snap.key})
    finally:
        sb.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    mgr = config.stash[manager_key]
    mgr.close()
    if hasattr(config, "workerinput"):
        config.workeroutput["sandbox_stats"] = json.dumps(  # type: ignore[attr-defined]
            {**mgr.stats.to_json(), "kept": config.stash[kept_key]}
        )
    else:
        # Sweep what crashed workers left (their sandboxes' processes died with them); not at
        # the price of waiting out another process's download: the next run sweeps then.
        with contextlib.suppress(SandboxError):
            mgr.gc(wait=False)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    data = getattr(node, "workeroutput", {}).get("sandbox_stats")
    if data:
        parsed = json.loads(data)
        node.config.stash[manager_key].stats.merge(parsed)
        node.config.stash[kept_key].extend(parsed.get("kept", []))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    mgr = config.stash[manager_key]
    st = mgr.stats
    if st.built or st.reused or st.pulled or st.forks:
        terminalreporter.write_line(st.summary())
    kept = config.stash[kept_key]
    if kept:
        terminalreporter.section("kept sandboxes")
        cache = f" --cache-dir {mgr.cache_dir}" if mgr.cache_dir else ""
        if mgr.resolved_name() != "local":
            cache += f" --backend {mgr.resolved_name()}"
        for k in kept:
            terminalreporter.write_line(f"{k['test']}: pytest-sandbox{cache} shell {k['key'][:12]}")


# -- fixtures -----------------------------------------------------------------------------------
def _manager(request: pytest.FixtureRequest) -> SessionManager:
    return request.config.stash[manager_key]


@pytest.fixture(scope="session")
def sandbox_backend(request: pytest.FixtureRequest) -> Backend:
    """The backend this run uses (``--sandbox-backend``: auto picks local where it works, else
    docker, else daytona), opened on first use."""
    try:
        return _manager(request).backend
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def sandbox_image() -> Image:
    """The recipe of the default sandbox, ``Image.host()`` unless your conftest.py overrides it
    with a session fixture returning an Image, e.g. ``Image.debian("bookworm").apt_install("git")``."""
    return Image.host()


@pytest.fixture(scope="session")
def sandbox_images() -> dict[str, Image]:
    """Named recipes that ``@pytest.mark.sandbox(image="name")`` and ``sandbox_factory("name")``
    pick from. Empty by default; override it in your conftest.py to return ``{name: Image}``."""
    return {}


def _snapshot(request: pytest.FixtureRequest, image: Image) -> Snapshot:
    try:
        return _manager(request).snapshot(image)
    except SandboxError as exc:
        message = str(exc)  # failed outside the except block: no "during handling" chain
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def sandbox_snapshot(request: pytest.FixtureRequest, sandbox_image: Image, sandbox_backend: Backend) -> Snapshot:
    """The snapshot of ``sandbox_image``: built once per setup key across all xdist workers and
    reused by later runs until the recipe changes."""
    return _snapshot(request, sandbox_image)


def _resolve(request: pytest.FixtureRequest, what: Image | Snapshot | str, where: str) -> Image | Snapshot:
    if isinstance(what, (Image, Snapshot)):
        return what
    images: dict[str, Image] = request.getfixturevalue("sandbox_images")
    if what in images:
        return images[what]
    if is_image_ref(what):
        return Image.from_ref(what)
    names = ", ".join(sorted(images)) or "none (override the sandbox_images fixture)"
    pytest.fail(f"{where}: no image named {what!r}; sandbox_images defines: {names}", pytrace=False)


def _create(
    request: pytest.FixtureRequest,
    what: Image | Snapshot,
    network: bool | Network | Sequence[str],
    env: Mapping[str, Any] | None,
    label: str,
    limits: Limits | None = None,
) -> Sandbox:
    snap = _snapshot(request, what) if isinstance(what, Image) else what
    try:
        env_ = {k: str(v) for k, v in (env or {}).items()}
        sb = _manager(request).create(snap, network=network, env=env_, limits=limits)
    except SandboxError as exc:
        message = f"{label}: {exc}"
    else:
        request.node.stash.setdefault(used_key, []).append((label, sb, 0))
        return sb
    pytest.fail(message, pytrace=False)


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, sandbox_backend: Backend) -> Iterator[Sandbox]:
    """A fresh copy-on-write fork of the session's snapshot, for this test only.

    ``@pytest.mark.sandbox(image=..., network=..., env=..., memory=..., pids=..., cpus=..., disk=...)``
    on the test, its class or module picks another image, gives it network (``network=True``), adds
    environment variables or sets its limits.
    """
    mark = request.node.get_closest_marker("sandbox")
    kwargs = dict(mark.kwargs) if mark else {}
    image = kwargs.get("image")
    # Not through the session-scoped sandbox_snapshot fixture: pytest would re-raise a build
    # failure cached there in full for every test, where the manager shows it once.
    what = (
        _snapshot(request, request.getfixturevalue("sandbox_image"))
        if image is None
        else _resolve(request, image, f"@pytest.mark.sandbox on {request.node.nodeid}")
    )
    network, env = kwargs.get("network", False), kwargs.get("env")
    sb = _create(request, what, network, env, request.node.nodeid, _marker_limits(kwargs))
    yield sb
    _finish(request, sb, request.node.nodeid)


@pytest.fixture(scope="session")
def worker_sandbox(request: pytest.FixtureRequest, sandbox_snapshot: Snapshot) -> Iterator[Sandbox]:
    """One sandbox per xdist worker (per session without xdist), shared by that worker's tests.

    Faster than ``sandbox`` when tests may share state; a failing test's report still lists
    the commands it ran in it.
    """
    try:
        sb = _manager(request).create(sandbox_snapshot)
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    request.config.stash[worker_sb_key] = sb
    request.node.stash.setdefault(used_key, []).append(("worker_sandbox", sb, 0))
    yield sb
    del request.config.stash[worker_sb_key]
    sb.close()


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest, sandbox_backend: Backend) -> Iterator[Callable[..., Sandbox]]:
    """Make more sandboxes in one test: ``sandbox_factory(what=None, network=False, env=None,
    limits=None)`` where ``what`` is an Image, a Snapshot (e.g. ``sandbox.snapshot()``) or an image
    name from ``sandbox_images``; default: the session's snapshot. All are closed after the test."""
    made: list[tuple[Sandbox, str]] = []

    def make(
        what: Image | Snapshot | str | None = None,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, Any] | None = None,
        limits: Limits | None = None,
    ) -> Sandbox:
        label = f"{request.node.nodeid}[factory {len(made)}]"
        target = (
            _snapshot(request, request.getfixturevalue("sandbox_image"))
            if what is None
            else _resolve(request, what, label)
        )
        sb = _create(request, target, network, env, label, limits)
        made.append((sb, label))
        return sb

    yield make
    errors = []
    for sb, label in made:
        try:
            _finish(request, sb, label)
        except Exception as exc:  # one failed close must not leak the rest
            errors.append(exc)
    if errors:
        raise errors[0]
