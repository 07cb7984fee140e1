"""A networked sandbox on the local engine has a network of its own (slirp4netns), never the
host's: the host's loopback services and abstract sockets are out of its reach, connections out
work, ``expose()`` reaches in, and the uplink goes with the sandbox and with its runner.

Its reach is the internet, not the host: the host's own addresses, its host-only networks and
link-local services (cloud metadata) are refused by rules in the sandbox's namespace, whatever
the host's firewall lets through locally; a Network policy narrows it further. Those cases run in
network namespaces the test makes ("the host" and "the internet"): no packet leaves them.

Run for real, as root and as an unprivileged user; skipped (naming the package) without
slirp4netns, in which case a networked sandbox is refused (never given the host's network).
"""

from __future__ import annotations

import http.server
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import EngineUnavailableError, Image, Network, Snapshot, SnapshotBuildError
from pytest_sandbox._build import loopback_proxies
from pytest_sandbox._netfilter import host_addresses, host_only_networks, rules
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.engine.net import MAX_FILES, Uplinks
from tests.conftest import needs_network, needs_tool, wait_for

FETCH = "python3 -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=3).read().decode())' {url}"


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
    needs_network(backend)
    with backend.create(host, network=True) as sb:
        devices = {line.split(":")[0].strip() for line in sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]}
        assert devices == {"lo", "tap0"}, devices
        assert sb.fs.read_text("/etc/resolv.conf") == "nameserver 10.0.2.3\n"
        host_ns = os.readlink("/proc/self/ns/net")
        assert sb.exec("readlink /proc/self/ns/net").stdout.strip() != host_ns


def test_a_networked_sandbox_cannot_reach_the_hosts_loopback(
    backend: LocalBackend, host: Snapshot, loopback_server: tuple[int, str]
) -> None:
    needs_network(backend)
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


def test_a_networked_sandbox_is_reached_through_expose(backend: LocalBackend, host: Snapshot) -> None:
    needs_network(backend)
    with backend.create(host, network=True) as sb:
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
    needs_network(backend)
    sb = backend.create(host, network=True)
    assert sb._sb.uplink is not None
    slirp = sb._sb.uplink.proc.pid
    assert _slirp_runs(slirp)
    if sb._cgroup is not None:  # it works for the sandbox: it is held by the sandbox's limits
        assert slirp in sb._cgroup.pids()
    assert resource.prlimit(slirp, resource.RLIMIT_NOFILE) == (MAX_FILES, MAX_FILES)
    sb.close()
    assert wait_for(lambda: not _slirp_runs(slirp))


def test_the_uplink_goes_with_a_killed_runner(backend: LocalBackend, tmp_path: Path) -> None:
    needs_network(backend)
    code = (
        "import sys, time\n"
        "from pytest_sandbox import Image\n"
        "from pytest_sandbox.backends.local import LocalBackend\n"
        "b = LocalBackend(sys.argv[1])\n"
        "sb = b.create(b.build(Image.host()), network=True)\n"
        "print(sb._sb.uplink.proc.pid, flush=True)\n"
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


def _without_slirp(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> Uplinks:
    monkeypatch.setenv("PATH", "/nonexistent")  # as on a machine without slirp4netns
    missing = Uplinks(root=not backend.rootless, nsenter=backend.host.nsenter, lockfile="/nonexistent")
    monkeypatch.undo()
    monkeypatch.setattr(backend.host, "uplinks", missing)
    return missing


def test_without_an_uplink_a_networked_sandbox_is_refused_never_given_the_hosts_network(
    backend: LocalBackend, host: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = _without_slirp(backend, monkeypatch)
    assert not missing.usable and missing.reason == "slirp4netns is not installed (apt-get install slirp4netns)"
    with pytest.raises(EngineUnavailableError, match=r"never the host's, and here slirp4netns is not installed \(apt"):
        backend.create(host, network=True)
    with backend.create(host) as sb:  # without network, nothing changes
        assert sb.exec("echo ok").stdout == "ok\n"


def test_without_an_uplink_build_steps_run_offline_and_a_failure_says_why(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_slirp(backend, monkeypatch)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    token = secrets.token_hex(4)
    with backend.create(Image.host().run(f"cat /proc/net/dev > /devices; : {token}")) as sb:
        assert "tap0:" not in sb.fs.read_text("/devices") and "lo:" in sb.fs.read_text("/devices")
    with pytest.raises(SnapshotBuildError, match="build steps have no network here: slirp4netns is not installed"):
        backend.build(Image.host().run(f"exit 3; : {token}"))


class _Proxy(http.server.BaseHTTPRequestHandler):
    """Stands for a proxy on the host's loopback (cntlm and the like): answers every request."""

    def do_GET(self) -> None:
        body = f"proxied {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_build_steps_have_a_network_of_their_own_and_reach_a_loopback_proxy_through_a_forwarder(
    backend: LocalBackend, loopback_server: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: with the proxy on the host's loopback, build steps ran in the host's network
    # namespace, and a step read any host loopback service and abstract socket.
    needs_network(backend)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    other_port, _ = loopback_server
    name = f"psb-{secrets.token_hex(6)}"
    try:
        for var in ("https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("http_proxy", f"http://localhost:{proxy.server_address[1]}")
        step = (
            "cat /proc/net/dev > /devices; "
            "python3 -c 'import urllib.request as u; print(u.urlopen(\"http://pypi.example/simple/\").read().decode())'"
            " > /via-proxy; "
            f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {other_port}), timeout=3)' "
            "2>/dev/null && echo reached > /other || echo refused > /other; "
            f"python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"\\0{name}\")' "
            f"2>/dev/null && echo reached > /abstract || echo refused > /abstract; : {secrets.token_hex(4)}"
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind("\0" + name)
            listener.listen()
            snap = backend.build(Image.host().run(step))
        with backend.create(snap) as sb:
            assert "tap0:" in sb.fs.read_text("/devices")  # its own network, with an uplink
            assert sb.fs.read_text("/via-proxy").strip() == "proxied http://pypi.example/simple/"
            assert sb.fs.read_text("/other").strip() == "refused"  # only the proxy's port is forwarded
            assert sb.fs.read_text("/abstract").strip() == "refused"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_proxy_on_loopback_is_recognised_and_pointed_at_the_forwarder() -> None:
    assert loopback_proxies({"http_proxy": "http://127.0.0.1:3128"}) == (
        {"http_proxy": "http://127.0.0.1:3128"},
        {3128: ("127.0.0.1", 3128)},
    )
    assert loopback_proxies({"HTTPS_PROXY": "localhost:8080"}) == (
        {"HTTPS_PROXY": "http://127.0.0.1:8080"},
        {8080: ("127.0.0.1", 8080)},
    )
    assert loopback_proxies({"https_proxy": "http://user:pw@[::1]:3128/"}) == (
        {"https_proxy": "http://user:pw@127.0.0.1:3128/"},
        {3128: ("::1", 3128)},
    )
    remote = {"http_proxy": "http://proxy.corp.example:3128", "no_proxy": "127.0.0.1"}
    assert loopback_proxies(remote) == (remote, {})
    assert loopback_proxies({}) == ({}, {})


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: rootless, mounts reach new namespaces as slaves")
def test_the_uplink_leaves_the_hosts_mounts_alone(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    # As /var/lib/docker is: a shared mount with mounts below it (every container's root). An
    # uplink that detached its old root in the host's mount namespace unmounted those on the host.
    needs_network(backend)
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
    needs_network(backend)
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


# -- the reach of a networked sandbox, in namespaces the test makes ------------------------------
NAMESPACES = r"""
set -eu
# This namespace stands for the host: an uplink to "the internet" (a second namespace), a
# host-only network, a link-local metadata address, and a port its firewall keeps from the uplink.
ip link set lo up
unshare --net sleep 600 </dev/null >/dev/null 2>&1 &
inet=$!
while [ "$(readlink /proc/$inet/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.01; done
in_inet() { nsenter -t "$inet" -n "$@"; }
ip link add uplink type veth peer name eth0 netns "$inet"
ip addr add 10.123.0.1/24 dev uplink
ip link set uplink up
in_inet ip link set lo up
in_inet ip addr add 10.123.0.2/24 dev eth0
in_inet ip addr add 203.0.113.9/32 dev lo
in_inet ip link set eth0 up
ip route add default via 10.123.0.2 dev uplink
ip link add hostonly type veth peer name hostonly-peer
ip addr add 192.168.77.1/24 dev hostonly
ip link set hostonly up
ip link set hostonly-peer up
ip addr add 169.254.169.254/32 dev lo
XTABLES_LOCKFILE="$TMP/xtables.lock" iptables -A INPUT -i uplink -p tcp --dport "$FIREWALLED" -j DROP
trap 'kill $inet $pids 2>/dev/null' EXIT
in_inet "$PY" -c "$SERVE" 203.0.113.9 "$PORT" internet >/dev/null 2>&1 &
pids="$!"
"$PY" -c "$SERVE" 0.0.0.0 "$PORT" host >/dev/null 2>&1 &
pids="$pids $!"
"$PY" -c "$SERVE" 0.0.0.0 "$FIREWALLED" firewalled >/dev/null 2>&1 &
pids="$pids $!"
$DROP "$PY" -c "$RUNNER"
"""

SERVE = r"""
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("up", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[3].encode())
    c.close()
"""

RUNNER = r"""
import json, os, sys
from pytest_sandbox import Image, Network
from pytest_sandbox.backends.local import LocalBackend

PORT, FIREWALLED = int(os.environ["PORT"]), int(os.environ["FIREWALLED"])
import time
time.sleep(1)  # the servers are up by then
TARGETS = {
    "internet": ("203.0.113.9", PORT),
    "host uplink address": ("10.123.0.1", PORT),
    "host firewalled port": ("10.123.0.1", FIREWALLED),
    "host-only network": ("192.168.77.1", PORT),
    "metadata": ("169.254.169.254", PORT),
}
REACH = (
    "import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(64).decode())"
)
out = {}
with LocalBackend(os.environ["TMP"] + "/cache") as b:
    snap = b.build(Image.host())
    for label, policy in (
        ("default", True),
        ("allow host-only", Network(allow=["192.168.77.1"])),
        ("deny internet", Network(deny=["203.0.113.0/24"])),
        ("allow list", ["203.0.113.9"]),
    ):
        with b.create(snap, network=policy) as sb:
            for name, (addr, port) in TARGETS.items():
                res = sb.exec(["python3", "-c", REACH, addr, str(port)])
                out[f"{label}: {name}"] = res.stdout.strip() or "refused"
print(json.dumps(out))
"""


def test_a_networked_sandbox_reaches_the_internet_not_what_the_host_keeps_from_it(
    backend: LocalBackend, tmp_path: Path
) -> None:
    # slirp4netns connects out as a host process: before, a networked sandbox reached the host's
    # own addresses (a port its firewall drops on the uplink included), a host-only network and a
    # link-local metadata service, none of which the outside reaches.
    needs_network(backend)
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("setpriv", "util-linux")):
        needs_tool(tool, f"apt-get install {package}")
    if os.geteuid() == 0:
        enter, drop = ["unshare", "--net"], ""
    else:  # a user namespace of our own holds the right to make interfaces; the runner drops it
        enter = ["unshare", "--user", "--map-current-user", "--net", "--keep-caps"]
        drop = "setpriv --inh-caps=-all --ambient-caps=-all"
    tmp_path.chmod(0o755)
    env = {
        **os.environ,
        "TMP": str(tmp_path),
        "PY": sys.executable,
        "SERVE": SERVE,
        "RUNNER": RUNNER,
        "DROP": drop,
        "PORT": "18301",
        "FIREWALLED": "18302",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    res = subprocess.run([*enter, "sh", "-c", NAMESPACES], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "default: internet": "internet",
        "default: host uplink address": "refused",
        "default: host firewalled port": "refused",
        "default: host-only network": "refused",
        "default: metadata": "refused",
        "allow host-only: internet": "refused",
        "allow host-only: host uplink address": "refused",
        "allow host-only: host firewalled port": "refused",
        "allow host-only: host-only network": "host",
        "allow host-only: metadata": "refused",
        "deny internet: internet": "refused",
        "deny internet: host uplink address": "refused",
        "deny internet: host firewalled port": "refused",
        "deny internet: host-only network": "refused",
        "deny internet: metadata": "refused",
        "allow list: internet": "internet",
        "allow list: host uplink address": "refused",
        "allow list: host firewalled port": "refused",
        "allow list: host-only network": "refused",
        "allow list: metadata": "refused",
    }


def test_the_hosts_addresses_and_host_only_networks_are_read_from_the_kernel() -> None:
    fib = """Local:
  +-- 0.0.0.0/0 3 0 4
     +-- 10.1.0.0/16 2 0 2
        |-- 10.1.2.3
           /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 172.17.0.1
        /32 host LOCAL
        /16 link UNICAST
"""
    route = (
        "Iface\\tDestination\\tGateway\\tFlags\\tRefCnt\\tUse\\tMetric\\tMask\\tMTU\\tWindow\\tIRTT\n"
        "eth0\\t00000000\\t0101010A\\t0003\\t0\\t0\\t0\\t00000000\\t0\\t0\\t0\n"
        "eth0\\t0000010A\\t00000000\\t0001\\t0\\t0\\t0\\t0000FFFF\\t0\\t0\\t0\n"
        "docker0\\t000011AC\\t00000000\\t0001\\t0\\t0\\t0\\t0000FFFF\\t0\\t0\\t0\n"
    ).replace("\\t", "\t")
    assert [str(n) for n in host_addresses(fib)] == ["10.1.2.3/32", "172.17.0.1/32"]  # loopback is the sandbox's own
    assert [str(n) for n in host_only_networks(route)] == ["172.17.0.0/16"]  # eth0 carries the default route


def test_policy_rules_hold_only_checked_values() -> None:
    text = rules(Network(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"]), dns=["10.0.2.3"], refused=[])
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    order = [line for line in lines if "10.9.0.0/16" in line or "10.0.0.0/8" in line or "169.254" in line]
    assert order == [
        "-A OUTPUT -d 10.9.0.0/16 -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -d 10.9.0.0/16 -j REJECT --reject-with icmp-admin-prohibited",
        "-A OUTPUT -d 10.0.0.0/8 -j ACCEPT",
        "-A OUTPUT -d 169.254.0.0/16 -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited",
    ]
    assert lines[-3:-1] == [  # an allow-list refuses the rest
        "-A OUTPUT -d 0.0.0.0/0 -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -d 0.0.0.0/0 -j REJECT --reject-with icmp-admin-prohibited",
    ]
    for bad in (["10.0.0.0/8 -j ACCEPT"], ["-A OUTPUT"], ["a b"], ["x" * 300]):
        with pytest.raises(ValueError, match="is not a CIDR"):
            Network(allow=bad)
