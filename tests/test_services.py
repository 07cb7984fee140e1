"""Services in snapshots: servers declared in the recipe are up and ready in every sandbox, and
``expose`` reaches them from the host.

Run for real on the local engine, as root and as an unprivileged user: a small HTTP server on the
host base (quick), and PostgreSQL on a Debian rootfs (mmdebstrap) for the real thing.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pytest_sandbox import ConfigError, Image, ServiceError, Snapshot, SnapshotBuildError, _services
from pytest_sandbox.backends.local import LocalBackend
from tests.conftest import needs_debian

PORT = 8000
WEB = (
    Image.host()
    .run("mkdir -p /srv && echo hello > /srv/index.html")
    .service(
        "web",
        start=f"cd /srv && exec python3 -m http.server {PORT} --bind 127.0.0.1",
        ready=f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {PORT}))'",
    )
    # Later steps run with the service up.
    .run(f"python3 -c 'import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:{PORT}/\").read())' > /srv/seen")
)

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_DATA = "/var/lib/postgresql/15/main"
POSTGRES = (
    Image.debian("bookworm", include=["postgresql"])
    .run("install -d -o postgres -g postgres /var/run/postgresql")
    .service(
        "postgres",
        start=f"exec runuser -u postgres -- {PG_BIN}/postgres -D {PG_DATA} "
        "-c config_file=/etc/postgresql/15/main/postgresql.conf -c ssl=off",
        ready=f"{PG_BIN}/pg_isready -q -h /var/run/postgresql",
        stop=f"runuser -u postgres -- {PG_BIN}/pg_ctl stop -m fast -w -D {PG_DATA}",
    )
    .run("runuser -u postgres -- psql -q -c \"ALTER USER postgres PASSWORD 'pw'\" -c 'CREATE TABLE t (v text)'")
    .run("runuser -u postgres -- psql -q -c \"INSERT INTO t VALUES ('from the build')\"")
)


def get(address: tuple[str, int], path: str = "/") -> bytes:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=10) as r:
        return bytes(r.read())


@pytest.fixture(scope="module")
def web(backend: LocalBackend) -> Snapshot:
    return backend.build(WEB)


@pytest.fixture(scope="module")
def postgres(backend: LocalBackend) -> Snapshot:
    if backend.rootless:
        pytest.skip("rootless sandboxes map one user id: PostgreSQL needs a user of its own (run as root)")
    needs_debian(backend, POSTGRES)
    return backend.build(POSTGRES)


def test_the_service_is_ready_in_every_sandbox_and_build_steps_ran_with_it(
    backend: LocalBackend, web: Snapshot
) -> None:
    assert [s.name for s in web.services] == ["web"]
    for _ in range(3):
        with backend.create(web) as sb:
            assert sb.services["web"].state == "ready"
            assert get(sb.expose(PORT)) == b"hello\n"
            assert sb.fs.read("/srv/seen") == b"b'hello\\n'\n"  # written by a step while it ran


def test_forks_do_not_see_each_other(backend: LocalBackend, web: Snapshot) -> None:
    with backend.create(web) as a, backend.create(web) as b:
        a.fs.write("/srv/index.html", "only in a\n")
        assert get(a.expose(PORT)) == b"only in a\n"
        assert get(b.expose(PORT)) == b"hello\n"
        assert a.expose(PORT) != b.expose(PORT)
        assert a.expose(PORT) == a.expose(PORT)  # one address per port and sandbox


def test_snapshot_and_fork_of_a_running_service(backend: LocalBackend, web: Snapshot) -> None:
    with backend.create(web) as sb:
        sb.fs.write("/srv/index.html", "changed\n")
        snap = sb.snapshot()
        assert sb.services["web"].state == "ready"  # stopped for the copy, started again
        assert get(sb.expose(PORT)) == b"changed\n"
        assert [s.name for s in snap.services] == ["web"]
        with sb.fork() as child, backend.create(snap) as other:
            for box in (child, other):
                assert box.services["web"].state == "ready"
                assert get(box.expose(PORT)) == b"changed\n"
                assert box.exec("ls /run/pytest-sandbox").stdout.split().count("web.pid") == 1


def test_expose_is_gone_after_close_and_a_closed_port_closes_the_client(backend: LocalBackend, web: Snapshot) -> None:
    sb = backend.create(web)
    address = sb.expose(PORT)
    nothing = sb.expose(9)  # nothing listens there inside
    with socket.create_connection(nothing, timeout=5) as c:
        assert c.recv(10) == b""  # closed at once, not hanging
    sb.close()
    with pytest.raises(OSError), socket.create_connection(address, timeout=2) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        if not c.recv(10):
            raise ConnectionResetError("closed")
    with pytest.raises(Exception, match="closed"):
        sb.expose(PORT)


def test_services_start_in_recipe_order_and_say_their_state(backend: LocalBackend, host: Snapshot) -> None:
    # /dev/shm is fresh in every sandbox (not in the snapshot): the order is this sandbox's.
    img = (
        Image.host()
        .service("first", start="sleep 0.2; echo a > /dev/shm/order; exec sleep 1000", ready="test -s /dev/shm/order")
        .service(
            "second",
            start="test -s /dev/shm/order && echo b >> /dev/shm/order && exec sleep 1000",
            ready="grep -q b /dev/shm/order",
        )
        .service("third", start="exec sleep 1000")  # no ready check: ready once started
    )
    with backend.create(backend.build(img)) as sb:
        assert sb.fs.read("/dev/shm/order") == b"a\nb\n"
        states = {n: s.state for n, s in sb.services.items()}
        assert states == {"first": "ready", "second": "ready", "third": "ready"}
        sb.exec("rm /dev/shm/order").check()
        assert sb.services["first"].state == "not ready"


def test_a_service_that_ignores_sigterm_is_killed_after_its_grace(backend: LocalBackend) -> None:
    img = Image.host().service("stubborn", start="trap '' TERM; echo up; while :; do sleep 1; done", grace=0.5)
    with backend.create(backend.build(img)) as sb:
        start = time.monotonic()
        with sb.fork() as child:
            assert time.monotonic() - start < 20
            assert child.services["stubborn"].state == "ready"
            assert "up" in child.services["stubborn"].log


def test_a_service_without_a_ready_check_is_running_when_create_returns(backend: LocalBackend) -> None:
    # setsid made slow: its session does not exist for half a second after the start's fork (CI
    # failed once so, under load: the service read as "not ready" right after create).
    slow = '#!/bin/sh\nsleep 0.5\nexec /usr/bin/setsid "$@"\n'
    img = (
        Image.host()
        .run(f"mkdir /srv/slow && printf %s {shlex.quote(slow)} > /srv/slow/setsid && chmod 0755 /srv/slow/setsid")
        .env(PATH="/srv/slow:/usr/sbin:/usr/bin:/sbin:/bin")
        .service("plain", start="exec sleep 1000")
    )
    with backend.create(backend.build(img)) as sb:
        assert sb.services["plain"].state == "ready"
        with sb.fork() as child:
            assert child.services["plain"].state == "ready"


def test_service_files_sandbox_code_makes_fifos_cost_the_runner_a_bounded_wait(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log and the file a ready check reads are the sandbox's: made FIFOs, reading them
    would block the runner's ``sb.services`` for ever."""
    img = Image.host().service("web", start="touch /srv/up; exec sleep 1000", ready="cat /srv/up", timeout=1)
    monkeypatch.setattr(_services, "_READ_TIMEOUT", 1.0)
    monkeypatch.setattr(_services, "_STATUS_MARGIN", 1.0)
    with backend.create(backend.build(img)) as sb:
        sb.exec("rm /srv/up /run/pytest-sandbox/web.log && mkfifo /srv/up /run/pytest-sandbox/web.log").check()
        start = time.monotonic()
        web = sb.services["web"]
        assert time.monotonic() - start < 15
        assert web.state == "not ready" and "could not be read within 1 s" in web.log


def test_a_service_that_never_gets_ready_fails_the_build_with_its_output(backend: LocalBackend) -> None:
    img = Image.host().service("broken", start="echo starting; exec sleep 1000", ready="false", timeout=1)
    with pytest.raises(SnapshotBuildError) as info:
        backend.build(img)
    text = str(info.value)
    assert "SERVICE broken" in text and "not ready within 1 s" in text and "starting" in text


def test_a_service_failing_in_sandboxes_is_reported_once_then_at_once(backend: LocalBackend) -> None:
    # It starts while the recipe builds, and fails in every sandbox of the final snapshot.
    img = (
        Image.host()
        .service(
            "flaky",
            start="test ! -e /etc/broken || { echo broken by a step; exit 3; }; touch /dev/shm/up; exec sleep 1000",
            ready="test -e /dev/shm/up",
        )
        .run("touch /etc/broken")
    )
    snap = backend.build(img)
    with pytest.raises(ServiceError, match="failed to start") as first:
        backend.create(snap)
    assert "broken by a step" in first.value.log
    start = time.monotonic()
    with pytest.raises(ServiceError, match="as before"):
        backend.create(snap)
    assert time.monotonic() - start < 1


def test_bad_service_declarations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="name"):
        Image.host().service("no spaces", start="x")
    with pytest.raises(ConfigError, match="start"):
        Image.host().service("x", start="")
    with pytest.raises(ConfigError, match="already has"):
        Image.host().service("x", start="a").service("x", start="b")
    with pytest.raises(ConfigError, match="timeout"):
        Image.host().service("x", start="a", timeout=0)
    assert Image.host().service("x", start="a").key != Image.host().service("x", start="b").key


# -- PostgreSQL ---------------------------------------------------------------------------------
@pytest.fixture
def psycopg() -> Iterator[object]:
    yield pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]'")


def test_postgres_in_every_fork_reachable_from_the_host(
    backend: LocalBackend,
    postgres: Snapshot,
    psycopg: object,
) -> None:
    connect = psycopg.connect  # type: ignore[attr-defined]
    with backend.create(postgres) as a, backend.create(postgres) as b:
        conns = []
        for sb in (a, b):
            host, port = sb.expose(5432)
            conns.append(connect(host=host, port=port, user="postgres", password="pw", dbname="postgres"))
        ca, cb = conns
        with contextlib.closing(ca), contextlib.closing(cb):
            assert ca.execute("SELECT v FROM t").fetchall() == [("from the build",)]
            ca.execute("INSERT INTO t VALUES ('only in a')")
            ca.commit()
            assert cb.execute("SELECT count(*) FROM t").fetchone() == (1,)
            assert ca.execute("SELECT count(*) FROM t").fetchone() == (2,)
        # The cluster was shut down cleanly before the snapshot was frozen: no crash recovery.
        log = a.exec(f"runuser -u postgres -- {PG_BIN}/pg_controldata {PG_DATA}").stdout
        assert "in production" in log
        started = a.services["postgres"]
        assert started.state == "ready" and "automatic recovery" not in started.log, started.log


def test_an_exposed_port_is_the_hosts_not_the_sandboxs(backend: LocalBackend, web: Snapshot) -> None:
    # The host side of expose() lives on the host's loopback. A sandbox without network has a
    # loopback of its own: the same address there reaches nothing (not the host, not a sibling).
    with backend.create(web) as sb, backend.create(web) as other:
        _, port = sb.expose(PORT)
        probe = f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=3)'"
        for box in (sb, other):
            res = box.exec(probe)
            assert res.exit_code != 0 and "Connection refused" in res.stderr, res
        with pytest.raises(ConfigError):
            sb.expose(0)
        with pytest.raises(ConfigError):
            sb.expose(True)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="protocol"):
            sb.expose(PORT, protocol="udp")
        assert get(sb.expose(PORT, protocol="http")) == b"hello\n"  # http is TCP here
