"""The daytona backend and the Daytona-compatible endpoint, through the real, unmodified SDK over HTTP.

The endpoint runs on localhost, backed by the local engine (conftest starts one per test run; CI
too). The shared behaviour suite (tests/test_behaviour.py) also runs against the daytona backend;
this file covers what only Daytona has: configuration errors, rate limiting, leaks found by label,
the safety-net settings, the endpoint's own API surface, and the plain-SDK example.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import Backend, ConfigError, EngineUnavailableError, Image, Limits, SandboxError, Snapshot
from pytest_sandbox.backends.local import LocalBackend
from tests.conftest import DEBIAN, needs_tool, wait_for
from tests.test_limits import ALLOC

daytona = pytest.importorskip("daytona", reason="pip install 'pytest-sandbox[daytona]'")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sdk(daytona_backend: Backend) -> object:
    """The plain SDK client, pointed at the same endpoint as the backend."""
    return daytona.Daytona()


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _serve(cache_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "pytest_sandbox.cli", "--cache-dir", str(cache_dir), "serve", "--daytona"]
    proc = subprocess.Popen(
        [
            *argv,
            "--port",
            "0",
            "--until-stdin-closes",
            *(() if "--api-key" in extra else ("--api-key", "local-tests")),
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("DAYTONA_API_URL="), line
    return proc, line.split("=", 1)[1]


@pytest.fixture
def endpoint(cache_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A second endpoint with the options a test marks it with (rate limits, keys, targets)."""
    marker = request.node.get_closest_marker("endpoint_args")
    proc, url = _serve(cache_dir, *(marker.args if marker else ()))
    yield url
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_missing_credentials_say_what_to_set(cache_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAYTONA_")}
    code = f"""
        from pytest_sandbox import open_backend
        try:
            open_backend("daytona", cache_dir={str(cache_dir)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert res.stdout.startswith("ConfigError"), res
    assert "DAYTONA_API_KEY" in res.stdout and "pytest-sandbox serve --daytona" in res.stdout


def test_missing_sdk_names_the_extra(cache_dir: Path) -> None:
    res = _python(
        f"""
        import sys
        sys.modules["daytona"] = None  # as if the extra were not installed
        from pytest_sandbox import open_backend
        try:
            open_backend("daytona", cache_dir={str(cache_dir)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    assert "EngineUnavailableError" in res.stdout and "pytest-sandbox[daytona]" in res.stdout, res


def test_unreachable_api_is_a_clear_error_with_the_sdk_error_chained(cache_dir: Path) -> None:
    from pytest_sandbox.backends.daytona import DaytonaBackend

    os.environ["DAYTONA_API_URL"], saved = "http://127.0.0.1:9/api", os.environ["DAYTONA_API_URL"]
    try:
        with pytest.raises(EngineUnavailableError, match=r"no Daytona API answers at http://127\.0\.0\.1:9/") as info:
            DaytonaBackend(cache_dir)
    finally:
        os.environ["DAYTONA_API_URL"] = saved
    assert isinstance(info.value.__cause__, daytona.DaytonaError)
    assert "pytest-sandbox serve" in str(info.value)


def test_a_cancel_that_comes_before_the_wrapper_starts_stops_it_from_running(
    backend: LocalBackend, host: Snapshot
) -> None:
    # On a busy machine or API the request that stops a cancelled exec can run before the one that
    # starts it: the wrapper must then not run the command at all (it once ran to its end, a fork
    # bomb included). The wrapper's and the stop command's shell, run for real in a sandbox.
    from pytest_sandbox.backends._daytona_exec import kill_command, wrap

    tag = secrets.token_hex(6)
    with backend.create(host) as sb:
        early = time.monotonic()
        sb.exec(["/bin/sh", "-c", kill_command(tag)]).check()  # nothing to kill yet: waits, then leaves
        assert time.monotonic() - early >= 1.5
        late = sb.exec(["/bin/sh", "-c", wrap(tag, ["sh", "-c", "touch /ran"], "/", None, 1 << 20)])
        assert late.ok and late.stdout == ""
        assert not sb.fs.exists("/ran")
        assert sb.exec(f"ls /tmp/.psb-{tag}.* 2>/dev/null | wc -l").stdout.strip() == "0"  # nothing left
        # and a wrapper that runs first is killed by the stop command (whole tree, then its files)
        tag = secrets.token_hex(6)
        sb.exec(["/bin/sh", "-c", wrap(tag, ["sh", "-c", "sleep 600; touch /ran"], "/", None, 1 << 20) + " &"])
        assert wait_for(lambda: sb.fs.exists(f"/tmp/.psb-{tag}.pid"))
        sb.exec(["/bin/sh", "-c", kill_command(tag)]).check()
        assert sb.exec("pgrep -f 'sleep 60[0]' | wc -l").stdout.strip() == "0"
        assert sb.exec(f"ls /tmp/.psb-{tag}.* 2>/dev/null | wc -l").stdout.strip() == "0"


def test_an_answer_that_never_comes_is_not_called_an_unreachable_api() -> None:
    # The SDK's time limit on an exec is the command's timeout plus a minute: past it the API is up
    # (it took the request) and the sandbox did not end the command, which the error says.
    from pytest_sandbox.backends._daytona_exec import translate

    def sdk_error(cause: BaseException) -> Exception:
        exc = daytona.DaytonaConnectionTimeoutError("Failed to execute command: ")
        exc.__cause__ = cause
        return exc

    late = translate(daytona, sdk_error(TimeoutError()), "run a command", "http://x/api", None)
    assert isinstance(late, EngineUnavailableError)
    assert "did not answer in time while trying to run a command" in str(late) and "delete it" in str(late)
    refused = translate(daytona, sdk_error(ConnectionRefusedError()), "run a command", "http://x/api", None)
    assert isinstance(refused, EngineUnavailableError) and "no Daytona API answers at http://x/api" in str(refused)


@pytest.mark.endpoint_args("--api-key", "s3cret", "--target", "eu")
@pytest.mark.usefixtures("mmdebstrap")
def test_wrong_key_and_unknown_target(endpoint: str, cache_dir: Path) -> None:
    res = _python(
        f"""
        from pytest_sandbox import open_backend, Image
        try:
            open_backend("daytona", cache_dir={str(cache_dir)!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
        """,
        env={"DAYTONA_API_URL": endpoint, "DAYTONA_API_KEY": "wrong"},
    )
    assert res.stdout.startswith("ConfigError") and "refused the credentials" in res.stdout, res
    res = _python(
        f"""
        from pytest_sandbox import open_backend, Image
        from tests.conftest import DEBIAN
        with open_backend("daytona", cache_dir={str(cache_dir)!r}) as b:
            try:
                b.build(DEBIAN.run("true"))
            except Exception as exc:
                print(type(exc).__name__, exc, "| caused by", type(exc.__cause__).__name__)
        """,
        env={"DAYTONA_API_URL": endpoint, "DAYTONA_API_KEY": "s3cret", "DAYTONA_TARGET": "mars"},
        timeout=600,
    )
    assert res.stdout.startswith("ConfigError"), res
    assert "DAYTONA_TARGET='mars'" in res.stdout and "available targets: eu" in res.stdout
    assert "caused by DaytonaBadRequestError" in res.stdout


@pytest.mark.endpoint_args("--rate-limit", "20")
def test_rate_limiting_backs_off_and_retries(endpoint: str, cache_dir: Path) -> None:
    # The plain SDK meets the limit...
    res = _python(
        """
        import daytona
        d = daytona.Daytona()
        try:
            for _ in range(200):
                list(d.snapshot.list().items)
        except daytona.DaytonaRateLimitError as exc:
            print("limited:", exc)
        """,
        env={"DAYTONA_API_URL": endpoint},
    )
    assert "limited:" in res.stdout and "Too Many Requests" in res.stdout, res
    # ...the backend, doing the same burst of work, backs off and finishes it.
    res = _python(
        f"""
        from pytest_sandbox import open_backend
        from tests.conftest import DEBIAN
        with open_backend("daytona", cache_dir={str(cache_dir)!r}) as b:
            for _ in range(60):
                list(b.snapshots())
            print("done")
        """,
        env={"DAYTONA_API_URL": endpoint},
        timeout=300,
    )
    assert res.stdout.strip() == "done", res


def test_sandboxes_carry_labels_and_the_safety_net(
    daytona_backend: Backend, daytona_debian: Snapshot, sdk: object
) -> None:
    with daytona_backend.create(daytona_debian) as sb:
        remote = sdk.get(sb.id)  # type: ignore[attr-defined]
        assert remote.labels["pytest-sandbox.key"] == daytona_debian.key
        assert remote.labels["pytest-sandbox.session"] == daytona_backend.store.owner  # type: ignore[attr-defined]
        assert remote.network_block_all is True
        assert (remote.auto_stop_interval, remote.auto_delete_interval) == (60, 0)
        assert remote.snapshot == "pytest-sandbox-" + daytona_debian.key
        fork = sb.fork()
        assert sdk.get(fork.id).labels["pytest-sandbox.session"] == remote.labels["pytest-sandbox.session"]  # type: ignore[attr-defined]
        fork.close()
    with pytest.raises(daytona.DaytonaNotFoundError):
        sdk.get(sb.id)  # type: ignore[attr-defined]


def _sessions_sandboxes(session: str) -> list[object]:
    return list(daytona.Daytona().list(daytona.ListSandboxesQuery(labels={"pytest-sandbox.session": session})))


def _holder(cache_dir: Path) -> subprocess.Popen[str]:
    code = f"""
        import time
        from pytest_sandbox import open_backend
        from tests.conftest import DEBIAN
        b = open_backend("daytona", cache_dir={str(cache_dir)!r})
        sb = b.create(b.build(DEBIAN))
        print(b.store.owner, b._watchdog.pid, flush=True)
        time.sleep(600)
        """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    return proc


@pytest.mark.usefixtures("mmdebstrap")
def test_kill_9_of_a_session_deletes_its_sandboxes(daytona_backend: Backend, cache_dir: Path) -> None:
    proc = _holder(cache_dir)
    assert proc.stdout is not None
    session, _ = proc.stdout.readline().split()
    assert len(_sessions_sandboxes(session)) == 1
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while _sessions_sandboxes(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _sessions_sandboxes(session) == []


@pytest.mark.usefixtures("mmdebstrap")
def test_gc_at_start_deletes_sandboxes_of_dead_sessions(daytona_backend: Backend, cache_dir: Path) -> None:
    proc = _holder(cache_dir)
    assert proc.stdout is not None
    session, watchdog = proc.stdout.readline().split()
    os.kill(int(watchdog), signal.SIGKILL)  # no watchdog either: only gc can find them now
    proc.kill()
    proc.wait()
    assert len(_sessions_sandboxes(session)) == 1
    from pytest_sandbox.backends.daytona import DaytonaBackend

    with DaytonaBackend(cache_dir):
        assert _sessions_sandboxes(session) == []


@pytest.mark.usefixtures("mmdebstrap")
def test_a_snapshot_another_machine_is_building_is_waited_for(daytona_backend: Backend, sdk: object) -> None:
    # "Another machine" starts building the base of a recipe through the plain SDK...
    image = Image.from_registry("debian:bookworm").run("echo step > /step")
    base_name = "pytest-sandbox-" + image.prefix_keys()[0]
    for key in image.prefix_keys():  # left by an interrupted earlier run
        with contextlib.suppress(daytona.DaytonaNotFoundError):
            sdk.snapshot.delete(sdk.snapshot.get("pytest-sandbox-" + key))  # type: ignore[attr-defined]
    started = time.monotonic()
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import daytona; img = daytona.Image.base('debian:bookworm')"
            f".run_commands('sleep 3 # {os.urandom(4).hex()}'); "
            f"daytona.Daytona().snapshot.create(daytona.CreateSnapshotParams(name={base_name!r}, image=img))",
        ]
    )
    try:
        while time.monotonic() - started < 30:
            try:
                sdk.snapshot.get(base_name)  # type: ignore[attr-defined]
                break
            except daytona.DaytonaNotFoundError:
                time.sleep(0.05)
        assert str(sdk.snapshot.get(base_name).state.value) in ("pending", "building")  # type: ignore[attr-defined]
        # ...and this backend, asked for the same recipe, waits for it instead of building its own.
        logs: list[str] = []
        snap = daytona_backend.build(image, on_log=logs.append)
    finally:
        other.wait(timeout=120)
    assert other.returncode == 0
    assert not any(line.startswith("[0/1]") for line in logs), logs  # the base was not built here
    with daytona_backend.create(snap) as sb:
        assert sb.fs.read_text("/step") == "step\n"
    daytona_backend.remove_snapshot(snap)
    daytona_backend.remove_snapshot(image.prefix_keys()[0])


@pytest.mark.usefixtures("mmdebstrap")
def test_plain_sdk_example_script(daytona_backend: Backend) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "daytona_sdk.py")], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for i in range(3):
        assert f"sandbox {i}: 42 on sandbox" in out, out
    assert "from the fork's snapshot: forked state" in out
    assert "the original is untouched: ['answer.txt']" in out


def test_endpoint_covers_what_the_sdk_calls(sdk: object) -> None:
    d = sdk
    sb = d.create()  # type: ignore[attr-defined]  # no snapshot: the endpoint's default base
    try:
        assert sb.state == "started"
        sb.fs.create_folder("/w", "750")
        sb.fs.upload_file(b"abc\x00\xff", "/w/f.bin")
        info = sb.fs.get_file_info("/w/f.bin")
        assert (info.size, info.is_dir, info.permissions) == (5, False, "0644")
        assert sb.fs.get_file_info("/w").permissions == "0750"
        sb.fs.set_file_permissions("/w/f.bin", mode="600")
        sb.fs.move_files("/w/f.bin", "/w/g.bin")
        assert [(f.name, f.permissions) for f in sb.fs.list_files("/w")] == [("g.bin", "0600")]
        assert sb.fs.download_file("/w/g.bin") == b"abc\x00\xff"
        with pytest.raises(daytona.DaytonaFileNotFoundError):
            sb.fs.download_file("/w/f.bin")
        res = sb.process.exec("echo $A; pwd; echo oops >&2; exit 4", cwd="/w", env={"A": "1"})
        assert (res.exit_code, res.result) == (4, "1\n/w\noops\n")
        with pytest.raises(daytona.DaytonaTimeoutError):
            sb.process.exec("sleep 30", timeout=1)
        sb.set_labels({"k": "v"})
        assert [s.id for s in d.list(daytona.ListSandboxesQuery(labels={"k": "v"}))] == [sb.id]  # type: ignore[attr-defined]
        sb.stop()  # files survive a stop, processes do not
        assert sb.state == "stopped"
        sb.start()
        assert sb.fs.download_file("/w/g.bin") == b"abc\x00\xff"
        sb.fs.delete_file("/w", recursive=True)
        assert sb.process.exec("test -e /w || echo gone").result == "gone\n"
    finally:
        sb.delete()
    with pytest.raises(daytona.DaytonaNotFoundError):
        d.snapshot.get("no-such-snapshot")  # type: ignore[attr-defined]
    copying = daytona.Image.base("debian:bookworm").dockerfile_commands(["COPY a b"])
    with pytest.raises(daytona.DaytonaBadRequestError, match="not supported by the local Daytona endpoint"):
        d.snapshot.create(daytona.CreateSnapshotParams(name="bad-" + os.urandom(4).hex(), image=copying))  # type: ignore[attr-defined]


def test_endpoint_snapshots_persist_across_restarts(tmp_path: Path, cache_dir: Path) -> None:
    first, url = _serve(cache_dir)
    env = {**os.environ, "DAYTONA_API_URL": url}
    name = "persist-" + os.urandom(4).hex()
    code = f"""
        import daytona
        d = daytona.Daytona()
        sb = d.create()
        sb.process.exec("echo kept > /kept")
        sb.create_snapshot({name!r})
        sb.delete()
        """
    assert subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=120).returncode == 0
    assert first.stdin is not None
    first.stdin.close()
    first.wait(timeout=30)
    second, url = _serve(cache_dir)
    try:
        code = f"""
            import daytona
            d = daytona.Daytona()
            sb = d.create(daytona.CreateSandboxFromSnapshotParams(snapshot={name!r}))
            print(sb.process.exec("cat /kept").result.strip())
            sb.delete()
            d.snapshot.delete(d.snapshot.get({name!r}))
            print(json.dumps([s.name for s in d.snapshot.list().items]))
            """
        res = subprocess.run(
            [sys.executable, "-c", "import json\n" + textwrap.dedent(code)],
            env={**env, "DAYTONA_API_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.stdout.splitlines()[0] == "kept", res.stderr
        assert name not in json.loads(res.stdout.splitlines()[1])
    finally:
        assert second.stdin is not None
        second.stdin.close()
        second.wait(timeout=30)


def test_host_and_rootfs_bases_are_refused_with_what_to_use(daytona_backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError, match=r"Image.debian\(...\) or Image.from_registry"):
        daytona_backend.build(Image.host())
    (tmp_path / "r").mkdir()
    with pytest.raises(EngineUnavailableError, match="registry"):
        daytona_backend.build(Image.from_rootfs(tmp_path / "r"))


def test_exec_failures_are_sandbox_errors(daytona_backend: Backend, daytona_debian: Snapshot) -> None:
    sb = daytona_backend.create(daytona_debian)
    sb.close()
    with pytest.raises(SandboxError, match="closed"):
        sb.exec("true")
    with daytona_backend.create(daytona_debian) as sb, pytest.raises(ConfigError):
        sb.exec([])


def test_the_endpoint_enforces_the_resources_a_request_asks_for(daytona_backend: Backend, sdk: Any) -> None:
    """Daytona's cpu/memory/disk become the local engine's limits, and its defaults too."""
    from daytona import CreateSandboxFromImageParams, Resources

    # A client names a registry image or a Debian suite (never the endpoint's host base); tail
    # holds a line of /dev/zero whole, so it takes what head gives it.
    needs_tool("mmdebstrap", "apt-get install mmdebstrap")
    image = "debian:bookworm"
    sb = sdk.create(CreateSandboxFromImageParams(image=image, resources=Resources(cpu=1, memory=1, disk=3)))
    try:
        assert (sb.cpu, sb.memory, sb.disk) == (1, 1, 3)
        res = sb.process.exec("head -c 1536M /dev/zero | tail -n 1 | wc -c")  # 1.5 GiB under 1 GiB
        assert str(1536 << 20) not in res.result, res
        small = sb.process.exec("head -c 256M /dev/zero | tail -n 1 | wc -c")
        assert small.exit_code == 0 and small.result.strip() == str(256 << 20), small
    finally:
        sdk.delete(sb)
    # Its disk too: a write past 1 GiB fails inside with ENOSPC, and df shows the limit.
    sized = sdk.create(CreateSandboxFromImageParams(image=image, resources=Resources(disk=1)))
    try:
        fill = sized.process.exec("dd if=/dev/zero of=/tmp/f bs=1M count=2000 2>&1; df -k --output=size / | tail -1")
        assert "No space left on device" in fill.result, fill.result
        assert int(fill.result.split()[-1]) <= 1 << 20
    finally:
        sdk.delete(sized)
    plain = sdk.create()  # no resources asked: the endpoint's defaults (1 core, 1 GiB, 10 GiB) hold
    try:
        assert (plain.cpu, plain.memory, plain.disk) == (1, 1, 10)
        assert str(1536 << 20) not in plain.process.exec("head -c 1536M /dev/zero | tail -n 1 | wc -c").result
    finally:
        sdk.delete(plain)


@pytest.mark.usefixtures("mmdebstrap")
def test_backend_limits_size_the_snapshots_it_builds(daytona_backend: Backend, cache_dir: Path) -> None:
    """Daytona sizes a sandbox by its snapshot: the backend's limits become the snapshot's
    resources (whole cores and GiB), which the endpoint's local engine then holds."""
    from pytest_sandbox.backends.daytona import DaytonaBackend

    with DaytonaBackend(cache_dir, limits=Limits(cpus=1, memory="1536M", disk="2G")) as sized:
        snap = sized.build(DEBIAN)
        assert snap.base["snapshot"] != daytona_backend.build(DEBIAN).base["snapshot"]  # not the default-sized one
        with sized.create(snap) as sb:
            lim = sb.limits
            assert (lim["cpus"].value, lim["memory"].value, lim["disk"].value) == (1.0, 2 << 30, 2 << 30)
            assert all(lim[n].enforced for n in ("cpus", "memory", "disk")), lim
            assert "pids" not in lim
            df = sb.exec("df -k --output=size / | tail -1").stdout
            assert 0.9 * (2 << 20) < int(df) <= 2 << 20, df
            assert sb.exec(ALLOC.format(n=3 << 30)).exit_code != 0  # 3 GiB under 2 GiB
        with sized.create(snap, limits=Limits(memory="4G", pids=100)) as other:
            lim = other.limits
            assert not lim["memory"].enforced and "--sandbox-limits" in lim["memory"].how
            assert lim["memory"].value == 4 << 30
            assert not lim["pids"].enforced and "no process limit" in lim["pids"].how


def test_expose_is_the_preview_link_for_http(daytona_backend: Backend, daytona_debian: Snapshot) -> None:
    """Daytona reaches a sandbox's HTTP ports through preview links; the endpoint's link is the
    port on this machine's loopback (the local engine's expose), with no token."""
    import urllib.request

    with daytona_backend.create(daytona_debian) as sb:
        sb.exec("mkdir -p /srv && echo from-daytona > /srv/i.html").check()
        sb.exec("cd /srv && python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &").check()
        sb.exec(
            "for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))' "
            "2>/dev/null && break; sleep 0.1; done"
        ).check()
        with pytest.raises(EngineUnavailableError, match="preview links only"):
            sb.expose(8000)  # as TCP: Daytona cannot
        host, port = sb.expose(8000, protocol="http")
        assert sb.expose(8000, protocol="http") == (host, port)
        token = sb.preview_token(8000)  # type: ignore[attr-defined]
        req = urllib.request.Request(f"http://{host}:{port}/i.html", headers={"X-Daytona-Preview-Token": token})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.read() == b"from-daytona\n"
        with pytest.raises(ConfigError):
            sb.expose(70000, protocol="http")
        with pytest.raises(ConfigError, match="protocol"):
            sb.expose(8000, protocol="udp")
