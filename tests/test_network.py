"""A networked sandbox on the local engine has a network of its own (slirp4netns), never the
host's: the host's loopback services and abstract sockets are out of its reach, connections out
work, ``expose()`` reaches in, and the uplink goes with the sandbox and with its runner.

Run for real, as root and as an unprivileged user; skipped (naming the package) without
slirp4netns, in which case a networked sandbox shares the host's network and says so.
"""

from __future__ import annotations

import http.server
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import Image, LimitWarning, Snapshot, errors
from pytest_sandbox._build import loopback_proxy
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.engine.net import MAX_FILES, Uplinks
from tests.conftest import needs_tool, wait_for

FETCH = "python3 -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=3).read().decode())' {url}"


def needs_uplink(backend: LocalBackend) -> None:
    """Skip unless networked sandboxes get a network of their own here (naming what is missing)."""
    uplinks = backend.host.uplinks
    if uplinks.slirp is None:
        needs_tool("slirp4netns", "apt-get install slirp4netns")
    if not uplinks.usable:
        pytest.skip(uplinks.reason)


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.token.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(address: str) -> Iterator[tuple[int, str]]:
    server = http.server.ThreadingHTTPServer((address, 0), _Answer)
    server.token = secrets.token_hex(8)  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], server.token  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, str]]:
    """An HTTP server on the host's loopback only: (port, the token it answers)."""
    yield from _serve("127.0.0.1")


def _outside_address() -> str | None:
    # The host's address on its default route (no packet is sent by connecting a UDP socket).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_a_networked_sandbox_has_a_network_of_its_own(backend: LocalBackend, host: Snapshot) -> None:
    needs_uplink(backend)
    with backend.create(host, network=True) as sb:
        devices = {line.split(":")[0].strip() for line in sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]}
        assert devices == {"lo", "tap0"}, devices
        assert sb.fs.read_text("/etc/resolv.conf") == "nameserver 10.0.2.3\n"
        host_ns = os.readlink("/proc/self/ns/net")
        assert sb.exec("readlink /proc/self/ns/net").stdout.strip() != host_ns


def test_a_networked_sandbox_cannot_reach_the_hosts_loopback(
    backend: LocalBackend, host: Snapshot, loopback_server: tuple[int, str]
) -> None:
    needs_uplink(backend)
    port, token = loopback_server
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3).read().decode() == token
    # An abstract Unix socket on the host (a session bus, X11 and the like are these).
    name = f"\0psb-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(name)
        listener.listen()
        with backend.create(host, network=True) as sb:
            for url in (f"http://127.0.0.1:{port}/", f"http://10.0.2.2:{port}/"):
                res = sb.exec(FETCH.format(url=url))
                assert res.exit_code != 0 and token not in res.stdout, (url, res)
            res = sb.exec(
                "python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); "
                f's.connect("\\0" + sys.argv[1]); print("connected")\' {name[1:]}'
            )
            assert "connected" not in res.stdout and "ConnectionRefusedError" in res.stderr, res
            # ... and it cannot listen on the host's ports either: what it binds is its own.
            sb.exec("python3 -m http.server --bind 127.0.0.1 18234 >/dev/null 2>&1 &").check()
            assert wait_for(lambda: sb.exec(FETCH.format(url="http://127.0.0.1:18234/")).ok)
            with pytest.raises(OSError):
                urllib.request.urlopen("http://127.0.0.1:18234/", timeout=2)


def test_a_networked_sandbox_connects_out_and_is_reached_through_expose(backend: LocalBackend, host: Snapshot) -> None:
    needs_uplink(backend)
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback to be reached at")
    for port, token in _serve(outside):
        with backend.create(host, network=True) as sb:
            res = sb.exec(FETCH.format(url=f"http://{outside}:{port}/"))
            assert res.stdout.strip() == token, res
            sb.exec("python3 -m http.server --bind 127.0.0.1 18235 >/dev/null 2>&1 &").check()
            assert wait_for(lambda: sb.exec(FETCH.format(url="http://127.0.0.1:18235/")).ok)
            addr, exposed = sb.expose(18235)
            assert urllib.request.urlopen(f"http://{addr}:{exposed}/", timeout=3).status == 200


def _slirp_runs(pid: int) -> bool:
    """Whether host process ``pid`` is (still) a slirp4netns."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"slirp4netns")
    except OSError:
        return False


def test_the_uplink_goes_with_its_sandbox(backend: LocalBackend, host: Snapshot) -> None:
    needs_uplink(backend)
    sb = backend.create(host, network=True)
    assert sb._uplink is not None
    slirp = sb._uplink.proc.pid
    assert _slirp_runs(slirp)
    if sb._cgroup is not None:  # it works for the sandbox: it is held by the sandbox's limits
        assert slirp in sb._cgroup.pids()
    assert resource.prlimit(slirp, resource.RLIMIT_NOFILE) == (MAX_FILES, MAX_FILES)
    sb.close()
    assert wait_for(lambda: not _slirp_runs(slirp))


def test_the_uplink_goes_with_a_killed_runner(backend: LocalBackend, tmp_path: Path) -> None:
    needs_uplink(backend)
    code = (
        "import sys, time\n"
        "from pytest_sandbox import Image\n"
        "from pytest_sandbox.backends.local import LocalBackend\n"
        "b = LocalBackend(sys.argv[1])\n"
        "sb = b.create(b.build(Image.host()), network=True)\n"
        "print(sb._uplink.proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runner = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert runner.stdout is not None
        slirp = int(runner.stdout.readline())
        assert _slirp_runs(slirp)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    assert wait_for(lambda: not _slirp_runs(slirp)), "slirp4netns outlived its runner"


def test_without_an_uplink_a_networked_sandbox_shares_the_hosts_network_and_says_so(
    backend: LocalBackend, host: Snapshot, loopback_server: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # as on a machine without slirp4netns
    missing = Uplinks(root=not backend.rootless, nsenter=backend.host.nsenter)
    monkeypatch.undo()
    assert not missing.usable and missing.reason == "slirp4netns is not installed (apt-get install slirp4netns)"
    monkeypatch.setattr(backend.host, "uplinks", missing)
    monkeypatch.setattr(errors, "_said", set())  # said once per process: this test must hear it
    port, token = loopback_server
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb = backend.create(host, network=True)
    with sb:
        assert sb.exec(FETCH.format(url=f"http://127.0.0.1:{port}/")).stdout.strip() == token
    said = [str(w.message) for w in caught if issubclass(w.category, LimitWarning)]
    assert any("shares the host's network here: slirp4netns is not installed (apt-get" in m for m in said), said


def test_build_steps_have_a_network_of_their_own_unless_the_proxy_is_on_loopback(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_uplink(backend)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # a token in the step makes each build a new one (not the cached snapshot of an earlier run)
    step = f"cat /proc/net/dev > /devices; : {secrets.token_hex(4)}"
    with backend.create(Image.host().run(step)) as sb:
        assert "tap0:" in sb.fs.read_text("/devices")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:3128")  # cntlm and the like listen there
    monkeypatch.setattr(errors, "_said", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snap = backend.build(Image.host().run(f"cat /proc/net/dev > /devices; : {secrets.token_hex(4)}"))
    with backend.create(snap) as sb:
        assert "tap0:" not in sb.fs.read_text("/devices")
    assert any("$http_proxy is a proxy on its loopback" in str(w.message) for w in caught)


def test_a_proxy_on_loopback_is_recognised() -> None:
    assert loopback_proxy({"http_proxy": "http://127.0.0.1:3128"}) == "http_proxy"
    assert loopback_proxy({"HTTPS_PROXY": "localhost:8080"}) == "HTTPS_PROXY"
    assert loopback_proxy({"https_proxy": "http://user:pw@[::1]:3128/"}) == "https_proxy"
    assert loopback_proxy({"http_proxy": "http://proxy.corp.example:3128", "no_proxy": "127.0.0.1"}) is None
    assert loopback_proxy({}) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: rootless, mounts reach new namespaces as slaves")
def test_the_uplink_leaves_the_hosts_mounts_alone(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # As /var/lib/docker is: a shared mount with mounts below it (every container's root). An
    # uplink that detached its old root in the host's mount namespace unmounted those on the host.
    needs_uplink(backend)
    shared, below = tmp_path / "shared", tmp_path / "shared" / "below"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "psb-shared", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        below.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "psb-below", str(below)], check=True)
        (below / "still-here").write_text("yes")
        with backend.create(host, network=True) as sb:
            assert sb.exec("echo up").stdout == "up\n"
        assert (below / "still-here").read_text() == "yes", "a networked sandbox unmounted a host mount"
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=False)


RAW_ATTACK = r"""
import socket, sys
for family, kind in ((socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW)):
    try:
        socket.socket(family, kind, socket.htons(3) if family == socket.AF_PACKET else socket.IPPROTO_UDP)
        print("raw socket made")
    except PermissionError:
        print("refused")
"""


def _cap_bits(status: str, field: str = "CapEff") -> int:
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")), 16)


def test_a_networked_sandbox_cannot_forge_packets_or_routes(backend: LocalBackend, host: Snapshot) -> None:
    # With CAP_NET_RAW a packet socket puts a hand-made packet for 127.0.0.1 on tap0, and with
    # CAP_NET_ADMIN a route does the same for an ordinary connect(): slirp4netns delivers either
    # to the host's loopback (--disable-host-loopback only guards its gateway address).
    needs_uplink(backend)
    net_raw, net_admin = 1 << 13, 1 << 12
    with backend.create(host, network=True) as sb:
        assert sb.exec(["python3", "-c", RAW_ATTACK]).stdout.split() == ["refused", "refused"]
        # No process has them to use, and none can get them back by exec (no_new_privs caps what
        # an exec gives at what the process had): a command, the sandbox's init and its holder.
        for who in ("self", "1", "2"):
            status = sb.exec(f"cat /proc/{who}/status").stdout
            for field in ("CapEff", "CapPrm", "CapAmb"):
                assert not _cap_bits(status, field) & (net_raw | net_admin), (who, field, status)
            assert "NoNewPrivs:\t1" in status, (who, status)
        assert not _cap_bits(sb.exec("cat /proc/self/status").stdout, "CapBnd") & (net_raw | net_admin)
        res = sb.exec("ip route add 127.0.0.2/32 dev tap0 || echo refused")
        assert "refused" in res.stdout or res.exit_code == 127, res  # 127: no ip in this image
    with backend.create(host) as offline:  # no uplink: nothing to reach, the caps stay
        assert _cap_bits(offline.exec("cat /proc/self/status").stdout) & net_raw
