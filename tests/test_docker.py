"""What only the docker backend has to prove: no container outlives its owner, and the errors a
missing SDK, a silent engine or a host base give. Needs a Docker engine (CI starts dockerd)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_sandbox import Backend, EngineUnavailableError, Image, Snapshot, SnapshotBuildError


def owned_containers(backend: Backend, owner: str) -> list[object]:
    client = backend.client  # type: ignore[attr-defined]
    return list(
        client.containers.list(all=True, ignore_removed=True, filters={"label": f"pytest-sandbox.owner={owner}"})
    )


def start_owner(cache_dir: Path, snap: Snapshot) -> tuple[subprocess.Popen[str], str, int]:
    """A process that opens a docker sandbox, prints its owner token and watchdog pid, then waits."""
    code = f"""
        import time
        from pytest_sandbox.backends.docker import DockerBackend
        b = DockerBackend({str(cache_dir)!r})
        sb = b.create(b.get_snapshot({snap.key!r}))
        sb.exec("sleep 1000 >/dev/null 2>&1 &").check()
        print(b.store.owner, b._watchdog.pid, flush=True)
        time.sleep(1000)
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.wait()
        raise AssertionError(f"the owner process failed to start: {proc.stderr.read()}")
    owner, watchdog = line
    return proc, owner, int(watchdog)


def test_kill_9_leaves_no_container_after_two_seconds(
    docker_backend: Backend, docker_debian: Snapshot, cache_dir: Path
) -> None:
    proc, owner, _ = start_owner(cache_dir, docker_debian)
    assert len(owned_containers(docker_backend, owner)) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    while owned_containers(docker_backend, owner) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    gone_after = time.monotonic() - killed
    assert not owned_containers(docker_backend, owner)
    assert gone_after < 5, f"the watchdog took {gone_after:.1f}s (stated: about two seconds)"


def test_containers_of_dead_sessions_are_removed_at_next_start(
    docker_backend: Backend, docker_debian: Snapshot, cache_dir: Path
) -> None:
    proc, owner, watchdog = start_owner(cache_dir, docker_debian)
    os.kill(watchdog, signal.SIGKILL)  # no watchdog left: only the next start can clean up
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert len(owned_containers(docker_backend, owner)) == 1
    from pytest_sandbox.backends.docker import DockerBackend

    with DockerBackend(cache_dir):  # gc runs at start
        pass
    assert not owned_containers(docker_backend, owner)


def test_missing_sdk_and_silent_engine_are_clear_errors(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["docker"] = None  # as if the extra were not installed
        from pytest_sandbox import open_backend
        try:
            open_backend("docker")
        except Exception as e:
            print(type(e).__name__, e)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("EngineUnavailableError") and "pip install 'pytest-sandbox[docker]'" in out
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    code = (
        "from pytest_sandbox import open_backend\n"
        "try:\n open_backend('docker')\nexcept Exception as e:\n print(type(e).__name__, e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.startswith("EngineUnavailableError") and "no Docker engine answers" in out and "no-engine.sock" in out


def test_host_base_is_a_clear_error(docker_backend: Backend) -> None:
    with pytest.raises(EngineUnavailableError, match=r"Image\.host\(\) needs the local engine"):
        docker_backend.build(Image.host().run("true"))


def test_snapshots_are_tagged_by_setup_key(docker_backend: Backend, docker_debian: Snapshot) -> None:
    from tests.conftest import DEBIAN

    client = docker_backend.client  # type: ignore[attr-defined]
    assert client.images.get(f"pytest-sandbox:{DEBIAN.key}").id
    assert docker_debian.key == DEBIAN.key


def test_from_rootfs_tarball_is_imported(
    docker_backend: Backend, backend: Backend, debian: Snapshot, tmp_path: Path
) -> None:
    # The local engine's Debian layer, packed as a plain rootfs tarball (what `docker export` gives).
    tar = tmp_path / "rootfs.tar"
    layer = backend.store.layer_path(debian.layers[0])  # type: ignore[attr-defined]
    subprocess.run(
        ["tar", "-C", str(layer), "-cf", str(tar), "./bin", "./etc", "./lib", "./lib64", "./usr"], check=True
    )
    snap = docker_backend.build(Image.from_rootfs(tar).run("echo imported > /marker"))
    with docker_backend.create(snap) as sb:
        assert sb.exec("cat /marker; test -f /etc/debian_version && echo debian").stdout == "imported\ndebian\n"
    docker_backend.remove_snapshot(snap)


def test_registry_base_is_pulled(
    docker_backend: Backend, docker_debian: Snapshot, backend: Backend, debian: Snapshot, registry: str, tmp_path: Path
) -> None:
    # A tiny image (sh and a few coreutils from the Debian layer) pushed to the local registry,
    # deleted from the engine, then used as a base: the build must pull it.
    layer = backend.store.layer_path(debian.layers[0])  # type: ignore[attr-defined]
    files = [
        "usr/bin/dash",
        "usr/bin/cat",
        "usr/bin/rm",
        "usr/bin/mkdir",
        "usr/bin/sleep",
        "usr/bin/readlink",
        "usr/bin/dirname",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib64/ld-linux-x86-64.so.2",
    ]
    root = tmp_path / "tiny"
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(layer / f, root / f, follow_symlinks=True)
    (root / "bin").mkdir()
    os.symlink("/usr/bin/dash", root / "bin" / "sh")
    ref = f"{registry}/psb/tiny:{secrets.token_hex(3)}"
    tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", ref], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    subprocess.run(["docker", "push", "-q", ref], check=True, capture_output=True)
    subprocess.run(["docker", "rmi", ref], check=True, capture_output=True)
    snap = docker_backend.build(Image.from_registry(ref).run("echo pulled > /marker"))
    with docker_backend.create(snap) as sb:
        assert sb.fs.read_text("/marker") == "pulled\n"
        assert sb.exec("cat /marker").stdout == "pulled\n"
    docker_backend.remove_snapshot(snap)
    with pytest.raises(SnapshotBuildError, match="pull failed"):
        docker_backend.build(Image.from_registry(f"{registry}/psb/missing:1"))


def test_limits_become_docker_flags_and_an_oom_is_reported(docker_backend: Backend, docker_debian: Snapshot) -> None:
    from pytest_sandbox.types import Limits

    with docker_backend.create(docker_debian, limits=Limits(memory="256M", pids=100, cpus=0.5)) as sb:
        host = sb.container.attrs["HostConfig"]  # type: ignore[attr-defined]
        assert (host["Memory"], host["MemorySwap"], host["PidsLimit"]) == (256 << 20, 256 << 20, 100)
        assert host["NanoCpus"] == 500_000_000
        lim = sb.limits
        assert all(lim[n].enforced and lim[n].how.startswith("docker --") for n in ("memory", "pids", "cpus"))
        disk = lim["disk"]
        assert disk.enforced == bool((host.get("StorageOpt") or {}).get("size"))
        if not disk.enforced:
            assert "storage driver" in disk.how  # says why, and names the driver
        res = sb.exec("python3 -c 'b = bytearray(1 << 30); b[::4096] = b\"x\" * len(b[::4096])'")
        assert res.exit_code == 137 and res.oom_killed, res
        bomb = sb.exec("for i in $(seq 150); do sleep 5 & done 2>&1; wait")
        assert "fork" in bomb.output.lower() or "resource" in bomb.output.lower(), bomb
    with docker_backend.create(docker_debian) as sb:  # the defaults hold without configuration
        host = sb.container.attrs["HostConfig"]  # type: ignore[attr-defined]
        assert host["PidsLimit"] == 4096 and host["Memory"] > 0


def test_expose_reaches_a_port_on_the_containers_loopback(docker_backend: Backend, docker_debian: Snapshot) -> None:
    import urllib.request

    with docker_backend.create(docker_debian) as sb:
        if os.geteuid() != 0:
            with pytest.raises(EngineUnavailableError, match="needs root"):
                sb.expose(8000)
            return
        sb.exec("mkdir -p /srv && echo from-docker > /srv/i.html").check()
        sb.exec("cd /srv && python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &").check()
        sb.exec("for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))' "
                "2>/dev/null && break; sleep 0.1; done").check()  # fmt: skip
        host, port = sb.expose(8000)
        with urllib.request.urlopen(f"http://{host}:{port}/i.html", timeout=10) as r:
            assert r.read() == b"from-docker\n"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}:{port}/i.html", timeout=5)


REACH = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('reached')"


def test_a_networked_container_has_a_network_of_its_own_and_not_the_hosts_addresses(
    docker_backend: Backend, docker_debian: Snapshot
) -> None:
    # Before: network=True was Docker's host network (the host's loopback services, its abstract
    # sockets, its ports); build steps too.
    if not docker_backend.reaches_in():  # type: ignore[attr-defined]
        pytest.skip("the policy is held from the host: root with the Docker engine on this machine")
    from pytest_sandbox._netfilter import host_addresses

    mine = [str(n.network_address) for n in host_addresses()]
    with docker_backend.create(docker_debian, network=True) as sb:
        assert sb.exec("readlink /proc/1/ns/net").stdout.strip() != os.readlink("/proc/self/ns/net")
        assert sb.exec("cat /proc/net/dev").stdout.count(":") >= 2  # lo and the bridge's eth0
        for addr in [*mine, "169.254.169.254"]:
            res = sb.exec(["python3", "-c", REACH, addr, "22"])  # refused in its own namespace: no packet leaves
            assert "reached" not in res.stdout and "ConnectionRefusedError" in res.stderr, (addr, res)
        raw = sb.exec(["python3", "-c", "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"])
        assert "PermissionError" in raw.stderr, raw  # no packet sockets to write past the rules
