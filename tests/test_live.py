"""Live snapshots: a sandbox's processes, memory included, frozen with its files and continued by
every sandbox created from the snapshot (CRIU, as root).

Where live snapshots cannot be taken (rootless, no CRIU, the docker backend) the tests that need
them skip naming why, and ``test_live_snapshot_says_why_where_it_cannot`` checks what users get
there instead. CI installs CRIU 4.2, so there the skips fail (PYTEST_SANDBOX_REQUIRE_TOOLS).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEBIAN, MISSING, needs_debian, run_py, wait_for
from test_services import POSTGRES

from pytest_sandbox import (
    Backend,
    ConfigError,
    EngineUnavailableError,
    Image,
    Limits,
    SandboxError,
    Snapshot,
    SnapshotError,
)
from pytest_sandbox.backends.local import LocalBackend, LocalSandbox
from pytest_sandbox.engine.live import externals_of
from pytest_sandbox.image import Service

# A process with state only its memory holds: a big random buffer (its hash), a counter a thread
# keeps counting, a loopback TCP connection between two of its threads, a pipe to a child process,
# and a value set from outside. It answers one request per connection on a unix socket.
AGENT = textwrap.dedent(
    """
    import hashlib, os, socket, subprocess, sys, threading, time
    buf = os.urandom(32 << 20)
    digest = hashlib.sha256(buf).hexdigest()
    state = {"count": 0, "value": "unset"}
    def count():
        while True:
            state["count"] += 1
            time.sleep(0.01)
    threading.Thread(target=count, daemon=True).start()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    def echo():
        while True:
            data = server.recv(100)
            if not data:
                return
            server.sendall(b"echo:" + data)
    threading.Thread(target=echo, daemon=True).start()
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    held = open("held.txt", "w+")  # an open file, written and read back at its offset
    held.write("line one\\n")
    held.flush()
    def answer(req):
        if req == "hash":
            return hashlib.sha256(buf).hexdigest() + " " + digest
        if req == "count":
            return str(state["count"])
        if req == "tcp":
            client.sendall(b"ping")
            return client.recv(100).decode()
        if req == "pipe":
            child.stdin.write(b"through the pipe\\n")
            child.stdin.flush()
            return child.stdout.readline().decode().strip()
        if req.startswith("set "):
            state["value"] = req[4:]
            return "ok"
        if req == "get":
            return state["value"]
        if req == "pid":
            return str(os.getpid())
        if req == "where":
            return os.getcwd() + " " + os.environ.get("PSB_MARK", "-")
        if req == "file":
            held.write("line two\\n")
            held.flush()
            held.seek(0)
            return held.read().replace("\\n", "|")
        return "?"
    us = socket.socket(socket.AF_UNIX)
    us.bind("/run/agent.sock")
    us.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = us.accept()
        with conn:
            conn.sendall(answer(conn.recv(1000).decode()).encode())
    """
)
ASK = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('/run/agent.sock'); "
    "s.sendall(sys.argv[1].encode()); print(s.recv(1000).decode())"
)


def ask(sb: LocalSandbox, request: str) -> str:
    """The agent's answer to ``request``, over its unix socket, from a command inside ``sb``."""
    res = sb.exec(["python3", "-c", ASK, request], timeout=30)
    assert res.exit_code == 0, res.stderr
    return res.stdout.strip()


def needs_live(backend: LocalBackend) -> None:
    """Skip, naming why, where live snapshots cannot be taken: rootless, or without a working CRIU
    4.2 (which CI has: there that skip fails, as for every missing tool)."""
    reason = backend.engine.criu.reason
    if reason and backend.rootless:
        pytest.skip(reason)
    if reason:
        pytest.skip(f"a working criu 4.2 or newer {MISSING}Debian sid's criu; see .ci/run): {reason}")


@pytest.fixture
def agent(backend: LocalBackend, debian: Snapshot) -> Iterator[LocalSandbox]:
    """A sandbox running the agent, its state built up."""
    needs_live(backend)
    with backend.create(debian) as sb:
        sb.fs.write("/work/agent.py", AGENT)
        sb.fs.mkdir("/work/state")
        sb.exec("cd /work/state && PSB_MARK=parent-env python3 /work/agent.py > /work/agent.log 2>&1 &")
        assert wait_for(lambda: sb.exec("cat /work/agent.log").stdout.startswith("ready"), timeout=30)
        assert ask(sb, "set parent") == "ok"
        yield sb


def sandbox_dirs(backend: LocalBackend) -> set[str]:
    """The sandboxes' directories (not the spare ones, made ahead of need)."""
    return {p.name for p, meta in backend.store.sandboxes() if not meta.get("spare")}


def test_three_concurrent_copies_continue_the_processes(backend: LocalBackend, agent: LocalSandbox) -> None:
    """Memory, a counting thread, a loopback TCP connection, a pipe and the unix socket survive in
    each of 3 copies restored at once; their writes are their own; a file written after the
    checkpoint is not in it; the parent runs on."""
    agent.fs.write("/work/before", "before")
    digest = ask(agent, "hash").split()
    assert digest[0] == digest[1]
    count = int(ask(agent, "count"))
    snap = agent.snapshot(live=True)
    agent.fs.write("/work/after", "after")
    assert snap.live and snap.process is not None
    assert ask(agent, "get") == "parent"  # the parent goes on

    copies: list[LocalSandbox] = []
    errors: list[BaseException] = []

    def restore() -> None:
        try:
            copies.append(backend.create(snap))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=restore) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len({c.id for c in copies}) == 3
        for i, c in enumerate(copies):
            assert ask(c, "hash").split() == digest
            first = int(ask(c, "count"))
            assert first >= count
            assert wait_for(lambda c=c, first=first: int(ask(c, "count")) > first, timeout=10)  # type: ignore[misc]
            assert ask(c, "tcp") == "echo:ping"
            assert ask(c, "pipe") == "through the pipe"
            assert ask(c, "get") == "parent"
            assert ask(c, "where") == "/work/state parent-env"  # its working directory and environment
            assert ask(c, "file") == "line one|line two|"  # its open file, at its offset
            assert c.fs.read("/work/before") == b"before"
            assert not c.fs.exists("/work/after")
            assert ask(c, "set " + f"copy{i}") == "ok"
            c.fs.write("/work/mine", f"copy{i}")
        for i, c in enumerate(copies):
            assert ask(c, "get") == f"copy{i}"
            assert c.fs.read("/work/mine") == f"copy{i}".encode()
        assert ask(agent, "get") == "parent"
        assert not agent.fs.exists("/work/mine")
        assert ask(agent, "tcp") == "echo:ping"
    finally:
        for c in copies:
            c.close()


def test_a_chain_of_live_snapshots(backend: LocalBackend, agent: LocalSandbox) -> None:
    """Forks of forks: each link adds to what the processes hold, and the next continues it."""
    sb = agent
    opened: list[LocalSandbox] = []
    try:
        for i in range(3):
            assert ask(sb, "set " + f"link{i}") == "ok"
            sb.fs.write(f"/work/link{i}", str(i))
            sb = sb.fork(live=True)
            opened.append(sb)
            assert ask(sb, "get") == f"link{i}"
            assert ask(sb, "tcp") == "echo:ping"
        files = sorted(sb.fs.listdir("/work"))
        assert files == sorted(["agent.py", "agent.log", "state", "link0", "link1", "link2"]), files
    finally:
        for s in opened:
            s.close()


def test_a_corrupted_image_is_refused_before_restore(backend: LocalBackend, agent: LocalSandbox) -> None:
    snap = agent.snapshot(live=True)
    images = backend.store.process_path(snap.key)
    victim = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.chmod(0o640)
    victim.write_bytes(bytes(data))
    with pytest.raises(SandboxError, match="changed since it was taken; refusing"):
        backend.create(snap)
    # Nothing half-made: no sandbox of it (other tests' sandboxes may come and go meanwhile).
    assert wait_for(lambda: not [m for _, m in backend.store.sandboxes() if m.get("snapshot") == snap.key])
    (images / "extra.img").write_bytes(b"")
    with pytest.raises(SandboxError, match="added to or removed"):
        backend.create(snap)


def test_images_are_out_of_every_sandboxs_reach(backend: LocalBackend, agent: LocalSandbox) -> None:
    """Process memory (secrets) is readable by the runner only: not from a sandbox, not by the
    sandboxes' host ids."""
    snap = agent.snapshot(live=True)
    images = backend.store.process_path(snap.key)
    for f in images.glob("*.img"):
        assert f.stat().st_mode & 0o007 == 0
        assert f.stat().st_uid == 0
    assert images.stat().st_mode & 0o007 == 0
    with backend.create(snap) as c:
        found = c.exec(f"ls {images} 2>&1; find / -xdev -name 'pages-*.img' 2>/dev/null | head -3")
        assert "pages-" not in found.stdout


def test_export_of_a_live_snapshot_carries_its_files_only(
    backend: LocalBackend, agent: LocalSandbox, tmp_path: Path
) -> None:
    """Process images never leave the machine: the archive has the files, the log says so."""
    snap = agent.snapshot(live=True)
    archive = tmp_path / "live.tar"
    said: list[str] = []
    backend.export(snap, archive, on_log=said.append)
    assert any("goes as its files" in line for line in said), said
    with LocalBackend(tmp_path / "other") as other:
        imported = [s for s in other.import_archive(archive) if s.key == snap.key]
        assert imported and not imported[0].live
        with other.create(imported[0]) as sb:
            assert sb.fs.exists("/work/agent.py")
            assert "agent.py" not in sb.exec("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout


PSQL = "runuser -u postgres -- psql -qtA -c"


def test_postgres_live_each_copy_answers_with_its_own_rows(backend: LocalBackend) -> None:
    needs_live(backend)
    image = POSTGRES  # its table t has one row from the build
    needs_debian(backend, image)
    with backend.create(backend.build(image)) as sb:
        sb.exec(f"{PSQL} \"INSERT INTO t SELECT 'row' || g FROM generate_series(1, 20000) g\"").check()
        snap = sb.snapshot(live=True)
        sb.exec(f"{PSQL} \"INSERT INTO t VALUES ('parent after')\"").check()
        copies = [backend.create(snap) for _ in range(3)]
        try:
            for i, c in enumerate(copies):
                assert c.exec(f"{PSQL} 'SELECT count(*) FROM t'").check().stdout.strip() == "20001"
                c.exec(f"{PSQL} \"INSERT INTO t VALUES ('copy{i}')\"").check()
            for i, c in enumerate(copies):
                rows = c.exec(f"{PSQL} \"SELECT v FROM t WHERE v LIKE 'copy%' OR v LIKE 'parent%'\"").check()
                assert rows.stdout.split() == [f"copy{i}"]
            assert sb.exec(f"{PSQL} 'SELECT count(*) FROM t'").check().stdout.strip() == "20002"
        finally:
            for c in copies:
                c.close()


def test_live_snapshot_says_why_where_it_cannot(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rootless, without CRIU, with a CRIU too old: an EngineUnavailableError saying what to do,
    nothing left half-made, and the sandbox goes on."""
    reason = backend.engine.criu.reason
    if not reason:  # make a place where it cannot: a CRIU too old for this kernel
        old = tmp_path / "criu"
        old.write_text("#!/bin/sh\necho 'Version: 3.17'\n")
        old.chmod(0o755)
        monkeypatch.setenv("PYTEST_SANDBOX_CRIU", str(old))
        with LocalBackend(backend.store.root.parent / "old-criu") as b2:
            assert "too old" in b2.engine.criu.reason
            check_refusal(b2, b2.build(Image.host()), "install CRIU 4.2")
        return
    expect = "need root" if os.geteuid() != 0 else "CRIU"
    with LocalBackend(tmp_path / "own-cache") as b:
        check_refusal(b, b.build(Image.host()), expect)


def check_refusal(backend: LocalBackend, snap: Snapshot, expect: str) -> None:
    """``backend`` has a cache of its own: the shared one also holds the other xdist worker's
    snapshots, made and removed meanwhile, so "nothing recorded" could not be told there."""
    with backend.create(snap) as sb:
        snaps = {s.key for s in backend.snapshots()}
        for call in (lambda: sb.snapshot(live=True), lambda: sb.fork(live=True)):
            with pytest.raises(EngineUnavailableError, match=expect):
                call()
        assert {s.key for s in backend.snapshots()} == snaps  # nothing recorded
        assert sb.exec("echo on").stdout == "on\n"


def test_docker_says_why(docker_backend: object, docker_debian: Snapshot) -> None:
    from pytest_sandbox.backends.docker import DockerBackend

    assert isinstance(docker_backend, DockerBackend)
    with docker_backend.create(docker_debian) as sb:
        with pytest.raises(EngineUnavailableError, match="local engine"):
            sb.snapshot(live=True)
        with pytest.raises(EngineUnavailableError, match="local engine"):
            sb.fork(live=True)


# The runner, killed with SIGKILL while it checkpoints or restores a sandbox of a hundred MiB.
KILLED = """
import os, sys, threading
from pytest_sandbox import Image
from pytest_sandbox.backends.local import LocalBackend
b = LocalBackend()
snap = b.build(Image.host())
sb = b.create(snap)
big = "import time; b = bytes(100 << 20).replace(bytes(1), bytes([7])); time.sleep(1000)"
sb.exec(f"python3 -c '{big}' >/dev/null 2>&1 &")
live = sb.snapshot(live=True)
print("go", flush=True)
while True:
    if sys.argv[1] == "checkpoint":
        sb.snapshot(live=True)
    else:
        b.create(live)
"""


@pytest.mark.parametrize("when", ["checkpoint", "restore"])
def test_kill_9_mid_checkpoint_or_restore_leaves_nothing(backend: LocalBackend, tmp_path: Path, when: str) -> None:
    needs_live(backend)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, when], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "go", proc.stderr.read() if proc.stderr else ""
    time.sleep(0.8)  # well inside the loop: a checkpoint or a restore is under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def leftovers() -> list[str]:
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                text = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/mountinfo").read_bytes()
            except OSError:
                continue
            if str(cache).encode() in text:
                found.append(pid)
        return found

    assert wait_for(lambda: not leftovers(), timeout=30), leftovers()
    res = run_py("from pytest_sandbox.backends.local import LocalBackend\nLocalBackend().gc()", cache)
    assert res.returncode == 0, res.stderr
    # Nothing half-made in the cache either: no work directory (a checkpoint's images), no
    # sandbox, and process images only for live snapshots that were recorded whole.
    assert not list((cache / "v2" / "t").iterdir())
    with LocalBackend(cache) as b:
        assert not sandbox_dirs(b)
        kept = {s.key for s in b.snapshots() if s.live}
        assert {p.name for p in (b.store.root / "p").iterdir()} <= kept
    assert str(cache) not in Path("/proc/self/mountinfo").read_text()


def test_a_live_snapshot_of_the_host_base(backend: LocalBackend, host: Snapshot) -> None:
    """The host base's directories are overlays the fork mounts anew."""
    needs_live(backend)
    with backend.create(host) as sb:
        sb.exec("sh -c 'x=41; while :; do sleep 0.05; done' &")
        sb.fs.write("/tmp/f", "x")
        with sb.fork(live=True) as c:
            assert c.fs.read("/tmp/f") == b"x"
            assert "while :" in c.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout


def test_a_live_fork_leaves_no_cgroup_behind(backend: LocalBackend, host: Snapshot) -> None:
    """CRIU restores the processes into the path they had below their cgroup namespace's root,
    which it makes below the fork's cgroup (v1's memory hierarchy here): those cgroups are the
    fork's, under its limits, and go with it. Before, the fork's cgroup could not be removed
    (busy with them): each close waited a second per hierarchy and left its cgroups behind."""
    needs_live(backend)
    with backend.create(host, limits=Limits(memory="512M")) as sb:
        sb.exec("sleep 1000 >/dev/null 2>&1 &").check()
        snap = sb.snapshot(live=True)
    grandchild = None
    with backend.create(snap) as fork:
        cg = fork._sb.cgroup
        if cg is None:
            pytest.skip("no cgroups for sandboxes here")
        dirs = list(cg.dirs.values())
        assert fork.exec("pgrep -x sleep").ok

        def cmdline(pid: int) -> bytes:
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return b""

        # the restored process counts as the fork's, though CRIU put it in a cgroup below
        assert b"sleep\x001000\x00" in [cmdline(p) for p in cg.pids()]
        grandchild = fork.snapshot(live=True)  # a live snapshot of a restored tree nests deeper
        with backend.create(grandchild) as again:
            deeper = list(again._sb.cgroup.dirs.values()) if again._sb.cgroup else []
            assert again.exec("pgrep -x sleep").ok
    backend.store.flush()  # a closed sandbox's cgroup goes with its directory, in the background
    assert [d for d in dirs + deeper if d.exists()] == []


def test_a_live_service_is_restored_warm(backend: LocalBackend, tmp_path: Path) -> None:
    """Image.service(live=True, warm=...): the build starts it, warms it, freezes it running;
    every sandbox continues that process instead of starting it."""
    needs_live(backend)
    src = tmp_path / "agent.py"
    src.write_text(AGENT)
    image = DEBIAN.copy(src, "/work/agent.py").service(
        "agent",
        start="exec python3 /work/agent.py",
        ready="test -S /run/agent.sock",
        live=True,
        warm=f"python3 -c {shlex.quote(ASK)} 'set warmed'",
    )
    needs_debian(backend, image)
    snap = backend.build(image)
    assert snap.live and [s.name for s in snap.services] == ["agent"]
    with backend.create(snap) as a, backend.create(snap) as b:
        assert ask(a, "get") == ask(b, "get") == "warmed"
        assert ask(a, "pid") == ask(b, "pid")  # the same process, continued in each
        assert ask(a, "set a") == "ok"
        assert ask(b, "get") == "warmed"
        assert ask(a, "tcp") == "echo:ping"
    # Later steps go on from it, live, without network.
    with backend.create(backend.build(image.run("echo later > /work/later"))) as c:
        assert ask(c, "get") == "warmed"
        assert c.fs.read("/work/later") == b"later\n"


def test_live_service_recipe_is_checked() -> None:
    with pytest.raises(ConfigError, match="only with live=True"):
        Image.host().service("s", start="x", warm="y")
    plain = Image.host().service("s", start="x")
    live = Image.host().service("s", start="x", live=True)
    assert plain.key != live.key  # frozen running or started: not the same snapshot
    assert plain.steps[-1].service() == Service("s", "x")
    assert live.steps[-1].service().live


def test_the_endpoints_fork_keeps_processes(
    backend: LocalBackend, daytona_backend: Backend, daytona_debian: Snapshot
) -> None:
    """The Daytona-compatible endpoint's fork continues the sandbox's processes when its engine can
    (it runs on this machine, as this user): here through the daytona backend and the SDK."""
    needs_live(backend)
    with daytona_backend.create(daytona_debian) as sb:
        sb.exec("sh -c 'echo $$ > /tmp/pid; exec sleep 1000' >/dev/null 2>&1 &")
        assert wait_for(lambda: sb.exec("cat /tmp/pid").stdout.strip().isdigit(), timeout=30)
        with sb.fork(live=True) as child:
            cmdline = child.exec("tr '\\0' ' ' < /proc/$(cat /tmp/pid)/cmdline").stdout
            assert cmdline.startswith("sleep 1000"), cmdline


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_plugin_fixtures_take_live_snapshots(
    pytester: pytest.Pytester, backend: LocalBackend, cache_dir: Path, xdist: list[str]
) -> None:
    """A recipe with a live service: every test's `sandbox` continues the one warmed process;
    `sandbox_factory` takes a live snapshot a test takes itself."""
    needs_live(backend)
    pytester.path.joinpath("server.py").write_text(
        textwrap.dedent(
            """
            import os, socket
            s = socket.socket(socket.AF_UNIX)
            s.bind("/run/s.sock")
            s.listen(8)
            n = 0
            while True:
                c, _ = s.accept()
                n += 1
                c.sendall(f"{os.getpid()} {n}".encode())
                c.close()
            """
        )
    )
    pytester.makeconftest(
        """
        import pytest
        from pytest_sandbox import Image

        ASK = "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/s.sock'); s.recv(99)"

        @pytest.fixture(scope="session")
        def sandbox_image():
            return (Image.host()
                    .copy("server.py", "/work/server.py")
                    .service("counter", start="exec python3 /work/server.py", ready="test -S /run/s.sock",
                             live=True, warm=f'python3 -c "{ASK}"'))
        """
    )
    pytester.makepyfile(
        **{
            f"test_l{i}": """
        ASK = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/s.sock'); "
               "print(s.recv(99).decode())")

        def ask(sb):
            return sb.exec(["python3", "-c", ASK]).check().stdout.split()

        def test_warm(sandbox, sandbox_factory):
            assert sandbox.snapshot_of.live
            pid, n = ask(sandbox)
            assert n == "2"  # the warm command's request was the first: this process is the built one
            assert ask(sandbox) == [pid, "3"]
            branch = sandbox.snapshot(live=True)
            with sandbox_factory(branch) as a:
                assert ask(a) == [pid, "4"]
            assert ask(sandbox) == [pid, "4"]
        """
            for i in range(4)
        }
    )
    res = pytester.runpytest_subprocess(f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", *xdist)
    res.assert_outcomes(passed=4)


def test_a_sandbox_adds_no_mount_a_checkpoint_would_carry(backend: LocalBackend, host: Snapshot) -> None:
    """A checkpoint's mounts are exactly the engine's (see the next test): sandbox code cannot add
    one (a bind of its files, a proc of its own, part of /sys), as root inside or not."""
    with backend.create(host) as sb:
        sb.exec("mkdir -p /tmp/m").check()
        for mount in ("mount --bind /etc /tmp/m", "mount -t proc proc /tmp/m", "mount --bind /sys/kernel /tmp/m"):
            res = sb.exec(mount)
            assert res.exit_code != 0, mount
        assert "/tmp/m" not in sb.exec("cat /proc/self/mountinfo").stdout


def test_externals_are_exactly_what_the_engine_mounts() -> None:
    """Pure logic: which mounts a checkpoint declares external (bound again from the host by the
    restore), which it leaves to CRIU, which it refuses."""

    def row(dev: str, root: str, point: str, fstype: str) -> str:
        return f"1 2 {dev} {root} {point} rw - {fstype} x rw"

    own = [row("0:1", "/", "/", "overlay"), row("0:57", "/", "/proc", "proc"), row("0:9", "/", "/dev", "tmpfs")]
    ok = [
        row("0:6", "/null", "/dev/null", "devtmpfs"),
        row("0:6", "/null", "/proc/keys", "devtmpfs"),
        row("0:21", "/sys", "/proc/sys", "proc"),
        row("0:22", "/", "/sys", "sysfs"),
        row("0:45", "/", "/usr", "overlay"),
        row("0:29", "/", "/sys/fs/cgroup/cpu", "cgroup"),
    ]
    ext, skipped = externals_of("\n".join(own + ok), overlays=["usr"])
    assert [(e.mountpoint, e.source) for e in ext] == [
        ("/dev/null", "/dev/null"),
        ("/proc/keys", "/dev/null"),
        ("/proc/sys", "/proc/sys"),
        ("/sys", "/sys"),
        ("/usr", "overlay:usr"),
    ]
    assert skipped == ["/sys/fs/cgroup/cpu"]
    for bad in (
        row("0:70", "/", "/tmp/p", "proc"),
        row("0:21", "/", "/proc/sys", "proc"),
        row("0:21", "/sys", "/tmp/s", "proc"),
        row("0:6", "/sda", "/tmp/d", "devtmpfs"),
        row("0:22", "/kernel", "/tmp/k", "sysfs"),
        row("0:22", "/", "/tmp/sys", "sysfs"),
        row("0:1", "/etc", "/tmp/m", "overlay"),
        row("0:45", "/", "/opt", "overlay"),
        row("0:80", "/", "/tmp/r", "ramfs"),
    ):
        with pytest.raises(SnapshotError, match="cannot keep the mount"):
            externals_of("\n".join([*own, bad]), overlays=["usr"])


def test_a_process_criu_refuses_is_a_snapshot_error(backend: LocalBackend, tmp_path: Path) -> None:
    """A process CRIU will not checkpoint (here one holding a file lock): SnapshotError with
    CRIU's reason, nothing cached, the sandbox and the process run on. A cache of its own (see
    check_refusal)."""
    needs_live(backend)
    with LocalBackend(tmp_path / "own-cache") as own, own.create(own.build(Image.host())) as sb:
        hold = "import fcntl, time; f = open('/tmp/l', 'w'); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(1000)"
        sb.exec(f'python3 -c "{hold}" >/dev/null 2>&1 &')
        assert wait_for(lambda: "FLOCK" in sb.exec("cat /proc/locks").stdout, timeout=30)
        before = {s.key for s in own.snapshots()}
        with pytest.raises(SnapshotError, match=r"file locks.*Held by: python3 \(pid \d+ in the sandbox\)"):
            sb.snapshot(live=True)
        assert {s.key for s in own.snapshots()} == before  # nothing recorded
        assert "time.sleep" in sb.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
