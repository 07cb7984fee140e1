"""The behaviour every backend promises, one suite run against each: the local engine (on a
Debian base and on the host base) and the docker backend (on the same Debian recipe).

Docker cases need a Docker engine: CI starts dockerd; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_sandbox import (
    Backend,
    ConfigError,
    ExecError,
    ExecTimeoutError,
    SandboxFileError,
    Snapshot,
    SnapshotBuildError,
    SnapshotNotFoundError,
    open_backend,
)
from tests.conftest import DEBIAN, Target, needs_network


def has_snapshot(backend: Backend, key: str) -> bool:
    try:
        return backend.get_snapshot(key).key == key
    except SnapshotNotFoundError:
        return False


def test_failing_step_names_step_exit_code_and_output_and_caches_nothing(debian_target: Target) -> None:
    backend = debian_target.backend  # builds on the Debian base of that backend
    image = DEBIAN.run("echo fine").run("echo about-to-fail; echo oops >&2; exit 7").run("echo never")
    with pytest.raises(SnapshotBuildError) as info:
        backend.build(image)
    err = info.value
    assert err.step_index == 2 and err.step_count == 3 and err.exit_code == 7
    assert "exit 7" in err.step and "about-to-fail" in str(err) and "oops" in str(err)
    keys = image.prefix_keys()
    assert has_snapshot(backend, keys[1])  # the good prefix is kept for the next attempt
    assert not has_snapshot(backend, keys[2]) and not has_snapshot(backend, keys[3])


def test_steps_run_in_order_with_env_workdir_and_copy(debian_target: Target, tmp_path: Path) -> None:
    backend = debian_target.backend  # builds on the Debian base of that backend
    app = tmp_path / "app"
    (app / "sub").mkdir(parents=True)
    (app / "main.py").write_text("print('hi from app')\n")
    (app / "sub" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (app / "sub" / "run.sh").chmod(0o755)
    (app / "link").symlink_to("main.py")
    image = (
        DEBIAN.copy(app, "/work/app")
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


def test_apt_and_pip_install(debian_target: Target) -> None:
    backend = debian_target.backend  # builds on the Debian base of that backend
    snap = backend.build(DEBIAN.apt_install("jq").pip_install("six==1.16.0"))
    with backend.create(snap) as sb:
        assert sb.exec("echo '{\"a\": 5}' | jq .a").check().stdout == "5\n"
        assert sb.exec("python3 -c 'import six; print(six.__version__)'").check().stdout == "1.16.0\n"


def test_exec_basics(target: Target) -> None:
    backend, base = target.backend, target.snapshot
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


def test_background_process_survives_between_execs_on_loopback(debian_target: Target) -> None:
    backend, debian = debian_target.backend, debian_target.snapshot
    with backend.create(debian) as sb:
        sb.exec("python3 -m http.server 8765 --bind 127.0.0.1 >/tmp/http.log 2>&1 &").check()
        fetch = (
            'python3 -c "import urllib.request,time\nfor i in range(100):\n try:\n'
            "  print(urllib.request.urlopen('http://127.0.0.1:8765/').status); break\n"
            ' except OSError: time.sleep(0.05)"'
        )
        assert sb.exec(fetch, timeout=30).stdout.strip() == "200"
        assert "http.server" in sb.exec("ps -eo args 2>/dev/null || cat /proc/[0-9]*/cmdline").stdout


def test_background_output_does_not_block_exec(target: Target) -> None:
    backend, base = target.backend, target.snapshot
    with backend.create(base) as sb:
        start = time.monotonic()
        r = sb.exec("(sleep 30; echo late) & echo now")
        assert r.stdout == "now\n" and time.monotonic() - start < 10


def test_output_past_max_output_is_cut_in_the_middle_and_says_so(target: Target) -> None:
    # Every backend cuts where the output is made, so the runner never holds more than the limit.
    backend, base = target.backend, target.snapshot
    limit = 1 << 20
    with backend.create(base) as sb:
        r = sb.exec(
            "echo first; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo last >&2; echo end", max_output=limit
        )
        assert r.truncated and r.exit_code == 0
        assert len(r.stdout) <= limit and r.stdout.startswith("first\n") and r.stdout.endswith("end\n")
        assert "bytes truncated by pytest-sandbox (max_output)" in r.stdout
        assert r.stderr == "last\n"
        small = sb.exec("echo hi; echo ho >&2", max_output=limit)
        assert (small.stdout, small.stderr, small.truncated) == ("hi\n", "ho\n", False)


def test_timeout_kills_whole_tree_and_says_so(target: Target) -> None:
    backend, base = target.backend, target.snapshot
    with backend.create(base) as sb:
        with pytest.raises(ExecTimeoutError, match=r"timed out after 0\.5s") as info:
            sb.exec("echo started; sleep 301 & setsid sleep 302 & sleep 303", timeout=0.5)
        assert info.value.result.stdout == "started\n" and info.value.result.timed_out
        procs = sb.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        assert "sleep 30" not in procs, procs
        assert sb.exec("echo still usable").stdout == "still usable\n"


def test_no_network_beyond_loopback_unless_asked(target: Target) -> None:
    backend, base = target.backend, target.snapshot
    with backend.create(base) as sb:
        ifaces = sb.exec("cat /proc/net/dev").stdout
        assert [line.split(":")[0].strip() for line in ifaces.splitlines()[2:]] == ["lo"]
    needs_network(backend)
    with backend.create(base, network=True) as sb:
        # an interface to reach out through (the local engine's own network: see test_network.py)
        names = [line.split(":")[0].strip() for line in sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]]
        assert "lo" in names and len(names) >= 2, names


def test_cannot_see_host_processes_homes_or_terminal(target: Target, tmp_path: Path) -> None:
    backend, base = target.backend, target.snapshot
    home_marker = Path.home() / f".pytest-sandbox-marker-{secrets.token_hex(4)}"
    home_marker.write_text("private")
    try:
        _check_isolation(backend, base, tmp_path, home_marker)
    finally:
        home_marker.unlink()


def _check_isolation(backend: Backend, base: Snapshot, tmp_path: Path, home_marker: Path) -> None:
    with backend.create(base) as sb:
        pids = [p for p in sb.fs.listdir("/proc") if p.isdigit()]
        assert len(pids) < 10, pids
        assert sb.exec("ls -A /home").stdout == ""
        assert not sb.fs.exists(str(home_marker)), "the host's home directory is visible"
        assert not sb.fs.exists(str(tmp_path))
        assert sb.exec("hostname").stdout == "sandbox\n"
        # No controlling terminal: TIOCSTI injection into the caller's terminal is impossible.
        assert sb.exec("exec 3</dev/tty").exit_code != 0


def test_fs_round_trip(target: Target, tmp_path: Path) -> None:
    backend, base = target.backend, target.snapshot
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


def test_fs_cannot_touch_host_files_outside_the_sandbox(target: Target, tmp_path: Path) -> None:
    backend, base = target.backend, target.snapshot
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


def test_snapshot_and_branches_are_independent(target: Target) -> None:
    backend, base = target.backend, target.snapshot
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


def test_racing_processes_build_a_key_exactly_once(debian_target: Target, cache_dir: Path) -> None:
    name = debian_target.backend.name
    marker = secrets.token_hex(6)
    code = f"""
        import sys
        from pytest_sandbox import Image
        from pytest_sandbox import open_backend
        sys.path.insert(0, {os.getcwd()!r})
        from tests.conftest import DEBIAN
        img = DEBIAN.run("echo building-{marker}; sleep 1; head -c16 /dev/urandom | od -An -tx1 > /tok")
        with open_backend({name!r}, cache_dir={str(cache_dir)!r}) as b:
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


def test_gc_leaves_sandboxes_of_other_cache_directories_alone(debian_target: Target, tmp_path: Path) -> None:
    # Another cache directory on this host (another user, another project) has its own live owners.
    backend, debian = debian_target.backend, debian_target.snapshot
    with backend.create(debian) as sb:
        with open_backend(backend.name, cache_dir=tmp_path / "another-cache") as other:  # gc runs at start
            other.gc()
        assert sb.exec("echo alive").stdout == "alive\n"


def test_fs_stat_tells_mode_size_owner_and_links(target: Target) -> None:
    import errno
    import stat as st

    with target.backend.create(target.snapshot) as sb:
        sb.fs.write("/tmp/st/f", b"hello", mode=0o640)
        sb.exec("ln -s f /tmp/st/link && (chown 12:34 /tmp/st/f || true)").check()
        info = sb.fs.stat("/tmp/st/f")
        assert (info.st_size, st.S_IMODE(info.st_mode), info.is_dir) == (5, 0o640, False)
        owner = (info.st_uid, info.st_gid)
        # A rootless sandbox maps only root: chown to other ids fails there, and the file stays root's.
        assert owner in ((12, 34), (0, 0))
        assert sb.fs.stat("/tmp/st/link").st_size == 5  # followed inside the sandbox
        assert st.S_ISLNK(sb.fs.stat("/tmp/st/link", follow_symlinks=False).st_mode)
        assert sb.fs.stat("/tmp/st").is_dir and sb.fs.stat("/tmp/st").st_uid == 0
        with pytest.raises(SandboxFileError) as err:
            sb.fs.stat("/tmp/st/missing")
        assert err.value.errno == errno.ENOENT
