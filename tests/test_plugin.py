"""The pytest plugin end to end: pytester runs real suites in subprocesses, with and without
xdist, against the real local engine."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sandbox.backends.local import LocalBackend

XDIST = [[], ["-n", "2"]]


@pytest.fixture
def run(pytester: pytest.Pytester, cache_dir: Path):  # type: ignore[no-untyped-def]
    def go(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", *args)

    return go


CONFTEST = """
import pytest
from pytest_sandbox import Image

@pytest.fixture(scope="session")
def sandbox_image():
    return Image.host().run("mkdir -p /work && echo default > /work/which").env(WHO="default")

@pytest.fixture(scope="session")
def sandbox_images():
    return {"other": Image.host().run("mkdir -p /work && echo other > /work/which")}
"""


@pytest.mark.parametrize("xdist", XDIST, ids=["serial", "xdist"])
def test_fixtures_and_marker(pytester: pytest.Pytester, run, xdist: list[str], backend: LocalBackend) -> None:  # type: ignore[no-untyped-def]
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_a="""
        import pytest

        def test_default(sandbox):
            assert sandbox.exec("cat /work/which; echo $WHO").stdout == "default\\ndefault\\n"
            sandbox.exec("echo dirty > /work/which").check()

        def test_fresh_fork_each_test(sandbox):
            assert sandbox.fs.read_text("/work/which") == "default\\n"

        @pytest.mark.sandbox(image="other", env={"X": 1})
        def test_marker_picks_named_image(sandbox):
            assert sandbox.exec("cat /work/which; echo $X").stdout == "other\\n1\\n"

        @pytest.mark.sandbox(image="host")
        def test_marker_base_reference(sandbox):
            assert not sandbox.fs.exists("/work/which")

        @pytest.mark.sandbox(network=True)
        def test_network(sandbox):
            assert len(sandbox.exec("cat /proc/net/dev").stdout.splitlines()) > 3

        def test_no_network_by_default(sandbox):
            assert len(sandbox.exec("cat /proc/net/dev").stdout.splitlines()) == 3

        @pytest.mark.sandbox(image="other")
        class TestClassMarker:
            def test_in_class(self, sandbox):
                assert sandbox.fs.read_text("/work/which") == "other\\n"

        def test_worker_sandbox_shared(worker_sandbox):
            worker_sandbox.exec("echo x >> /work/count").check()
            assert worker_sandbox.fs.exists("/work/count")

        def test_factory_branches(sandbox, sandbox_factory):
            sandbox.exec("echo a > /state").check()
            a, b = sandbox_factory(sandbox.snapshot()), sandbox_factory(sandbox.snapshot())
            a.exec("echo A > /state").check()
            assert b.fs.read_text("/state") == "a\\n" and a.fs.read_text("/state") == "A\\n"
            c = sandbox_factory("other")
            assert c.fs.read_text("/work/which") == "other\\n"
            assert sandbox_factory().fs.read_text("/work/which") == "default\\n"
        """,
        test_b="""
        import pytest
        pytestmark = pytest.mark.sandbox(image="other")

        def test_module_marker(sandbox):
            assert sandbox.fs.read_text("/work/which") == "other\\n"
        """,
    )
    result = run(*xdist)
    if backend.host.uplinks.usable:
        result.assert_outcomes(passed=10)
    else:  # never the host's network: the test that asks for one fails, saying what to install
        result.assert_outcomes(passed=9, errors=1)
        result.stdout.fnmatch_lines(
            [f"*network=True gives a sandbox a network of its own*{backend.host.uplinks.reason}*"]
        )
    result.stdout.re_match_lines([r"sandbox: \d+ snapshots built, \d+ reused, \d+ sandboxes forked, median fork .* ms"])


def test_fixtures_are_documented(pytester: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile("def test_x(): pass")
    result = run("--fixtures")
    for name in (
        "sandbox_backend",
        "sandbox_image",
        "sandbox_images",
        "sandbox_snapshot",
        "sandbox",
        "worker_sandbox",
        "sandbox_factory",
    ):
        result.stdout.fnmatch_lines([f"{name}*", "*"])
    out = result.stdout.str()
    assert "fresh copy-on-write fork" in out and "one sandbox per xdist worker" in out.lower()
    help_out = run("--help").stdout.str()
    assert "--sandbox-keep" in help_out and "sandbox_backend" in help_out
    markers = run("--markers").stdout.str()
    assert "sandbox(image=None, network=False, env=None, memory=None, pids=None, cpus=None, disk=None)" in markers
    assert "--sandbox-limits" in help_out and "sandbox_limits" in help_out


@pytest.mark.parametrize("xdist", XDIST, ids=["serial", "xdist"])
def test_token_built_once_per_key_across_workers_and_runs(
    pytester: pytest.Pytester,
    run,  # type: ignore[no-untyped-def]
    xdist: list[str],
) -> None:
    salt = secrets.token_hex(4)
    pytester.path.joinpath("data").mkdir()
    pytester.path.joinpath("data", "f.txt").write_text("v1")
    pytester.makeconftest(f"""
        import pytest
        from pytest_sandbox import Image

        @pytest.fixture(scope="session")
        def sandbox_image():
            return (Image.host().copy("data", "/work/data")
                    .run("echo {salt} >/dev/null; head -c8 /dev/urandom | od -An -tx1 | tr -d ' ' > /work/token"))
        """)
    pytester.makepyfile(
        **{
            f"test_t{i}": f"""
        import os
        def test_token(sandbox):
            with open(os.path.join({str(pytester.path)!r}, "tokens.txt"), "a") as f:
                f.write(sandbox.fs.read_text("/work/token"))
        """
            for i in range(6)
        }
    )
    tokens = pytester.path / "tokens.txt"

    first = run(*xdist)
    first.assert_outcomes(passed=6)
    seen = set(tokens.read_text().split())
    assert len(seen) == 1 and len(tokens.read_text().split()) == 6
    first.stdout.re_match_lines([r"sandbox: 1 snapshots built, \d+ reused, 6 sandboxes forked.*"])

    tokens.unlink()
    second = run(*xdist)
    second.assert_outcomes(passed=6)
    assert set(tokens.read_text().split()) == seen
    second.stdout.re_match_lines([r"sandbox: 0 snapshots built, [12] reused, 6 sandboxes forked.*"])
    assert "reused (built" in second.stdout.str() + second.stderr.str()

    tokens.unlink()
    pytester.path.joinpath("data", "f.txt").write_text("v2")
    third = run(*xdist)
    third.assert_outcomes(passed=6)
    new = set(tokens.read_text().split())
    assert len(new) == 1 and new != seen

    tokens.unlink()
    fourth = run(*xdist, "--sandbox-rebuild")
    fourth.assert_outcomes(passed=6)
    rebuilt = set(tokens.read_text().split())
    assert len(rebuilt) == 1 and rebuilt != new, "--sandbox-rebuild builds again, once for all workers"


@pytest.mark.parametrize("xdist", XDIST, ids=["serial", "xdist"])
def test_keep_failed_keeps_exactly_the_failed_tests(
    pytester: pytest.Pytester,
    run,
    cache_dir: Path,  # type: ignore[no-untyped-def]
    xdist: list[str],
) -> None:
    tag = secrets.token_hex(3)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.parametrize("i", range(4))
        def test_k(sandbox, i):
            sandbox.exec("mkdir -p /work && echo {tag}-$0 > /work/state", ).check()
            sandbox.exec(f"echo {tag}-{{i}} > /work/state").check()
            assert i not in (1, 3)
        """)
    result = run(*xdist, "--sandbox-keep=failed")
    result.assert_outcomes(passed=2, failed=2)
    lines = [ln for ln in result.stdout.lines if "pytest-sandbox" in ln and " shell " in ln]
    assert sorted(ln.split(":")[2].split("]")[0][-1] for ln in lines if "test_k[" in ln) == ["1", "3"], lines
    with LocalBackend(cache_dir) as b:
        for line in lines:
            key = line.rsplit(" ", 1)[1]
            i = re.search(r"test_k\[(\d)\]", line).group(1)  # type: ignore[union-attr]
            with b.create(b.get_snapshot(key)) as sb:
                assert sb.fs.read_text("/work/state") == f"{tag}-{i}\n"
            b.remove_snapshot(key)


@pytest.mark.parametrize("xdist", XDIST, ids=["serial", "xdist"])
def test_failing_setup_step_is_reported_once_with_its_output(
    pytester: pytest.Pytester,
    run,  # type: ignore[no-untyped-def]
    xdist: list[str],
) -> None:
    marker = secrets.token_hex(4)
    pytester.makeconftest(f"""
        import pytest
        from pytest_sandbox import Image
        @pytest.fixture(scope="session")
        def sandbox_image():
            return Image.host().run("echo fine").run("echo out-$((40+2))-{marker}; exit 9")
        """)
    pytester.makepyfile(**{f"test_f{i}": "def test_x(sandbox): pass\ndef test_y(sandbox): pass" for i in range(3)})
    result = run(*xdist)
    result.assert_outcomes(errors=6)
    # pytest's own short summary repeats a message in full under CI=true: count the reports only.
    out = result.stdout.str().split("short test summary info")[0]
    assert out.count(f"out-42-{marker}") == 1, out
    assert "step 2/2" in out and "exit code 9" in out
    assert "failed to build earlier in this run" in out
    assert "Traceback" not in out


def test_failing_test_report_lists_execs(pytester: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile("""
        def test_fail(sandbox):
            sandbox.exec("echo hello-from-sandbox; exit 3")
            sandbox.exec(["true"])
            assert False
        """)
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- sandbox -*",
            "*sandbox * from snapshot * (2 execs)",
            "$ echo hello-from-sandbox; exit 3",
            "  -> exit 3 in * ms",
            "  | hello-from-sandbox",
            "$ true",
        ]
    )


def test_bad_marker_and_options_are_usage_errors(pytester: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile("""
        import pytest
        @pytest.mark.sandbox(imgae="x")
        def test_typo(sandbox): pass
        """)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_bad_marker_and_options_are_usage_errors.py::test_typo*unknown argument(s) imgae*"]
    )
    assert run("--sandbox-keep=sometimes").ret == pytest.ExitCode.USAGE_ERROR
    assert run("--sandbox-backend=vm").ret == pytest.ExitCode.USAGE_ERROR
    pytester.makepyfile("""
        import pytest
        @pytest.mark.sandbox(env={"JAVA-HOME": "/opt/jdk"})
        def test_env(sandbox): pass
        """)
    result = run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_env*env= environment variable name 'JAVA-HOME' is not valid*"])


def test_unknown_image_name_fails_the_test_clearly(pytester: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile("""
        import pytest
        @pytest.mark.sandbox(image="nosuch")
        def test_x(sandbox): pass
        """)
    result = run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no image named 'nosuch'; sandbox_images defines: none*"])


def test_killed_worker_leaves_no_sandbox_behind(pytester: pytest.Pytester) -> None:
    # A cache of its own: in the run's shared one, other tests' killed runners leave sandboxes
    # for a moment too, and this test would count them.
    cache_dir = pytester.path / "cache"
    tag = secrets.token_hex(4)
    pytester.makepyfile(f"""
        import os, signal
        def test_dies(sandbox):
            sandbox.exec("sleep 1000 {tag} >/dev/null 2>&1 &").check()
            os.kill(os.getpid(), signal.SIGKILL)

        def test_ok(sandbox):
            assert sandbox.exec("true").ok
        """)
    result = pytester.runpytest_subprocess(f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=1, failed=1)
    assert "crashed" in result.stdout.str() or "node down" in result.stdout.str()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"sleep 1000 {tag}" not in ps
    with LocalBackend(cache_dir) as b:
        store = b.store
        assert not [d for d, m in store.sandboxes() if not store.owner_alive(m.get("owner"))]


def test_no_sandbox_fixture_no_backend(pytester: pytest.Pytester) -> None:
    # A suite that never asks for a sandbox must not need a working engine or a cache.
    pytester.makepyfile("def test_plain(): assert True")
    result = pytester.runpytest_subprocess("--sandbox-backend=daytona", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert os.environ.get("PYTEST_SANDBOX_NEVER_SET") is None


@pytest.mark.parametrize("name", ["docker", "daytona"])
def test_plugin_on_remote_backends_keeps_failed_sandboxes_openable(
    run,
    name: str,
    request: pytest.FixtureRequest,
    pytester: pytest.Pytester,  # type: ignore[no-untyped-def]
) -> None:
    backend = request.getfixturevalue(f"{name}_backend")
    request.getfixturevalue(f"{name}_debian")  # built once here, reused by the run below
    pytester.makeconftest("""
        import pytest
        from pytest_sandbox import Image

        @pytest.fixture(scope="session")
        def sandbox_image():
            return Image.debian("bookworm", include=["python3", "python3-pip"])
        """)
    pytester.makepyfile("""
        import pytest
        @pytest.mark.parametrize("i", range(3))
        def test_k(sandbox, i):
            sandbox.exec(f"echo state-{i} > /state").check()
            assert i != 1
        """)
    result = run(f"--sandbox-backend={name}", "--sandbox-keep=failed", "-n", "2")
    result.assert_outcomes(passed=2, failed=1)
    kept = [line for line in result.stdout.lines if " shell " in line]
    assert len(kept) == 1 and "test_k[1]" in kept[0] and f"--backend {name}" in kept[0], kept
    argv = kept[0].split(": ", 1)[1].split()
    assert argv[0] == "pytest-sandbox"
    shell = subprocess.run(
        [sys.executable, "-m", "pytest_sandbox.cli", *argv[1:], "cat", "/state"], capture_output=True, text=True
    )
    if name == "daytona":  # docker's shell is `docker run -it`, which needs a terminal
        assert shell.stdout == "state-1\n", shell.stderr
    key = argv[-1]
    ls = subprocess.run([sys.executable, "-m", "pytest_sandbox.cli", *argv[1:-2], "ls"], capture_output=True, text=True)
    assert key in ls.stdout, ls.stdout + ls.stderr
    with backend.create(backend.get_snapshot(key)) as sb:
        assert sb.fs.read_text("/state") == "state-1\n"
    backend.remove_snapshot(key)


@pytest.mark.parametrize("xdist", XDIST, ids=["serial", "xdist"])
def test_limits_from_marker_ini_and_factory_and_the_report_names_the_limit_hit(
    pytester: pytest.Pytester,
    run,  # type: ignore[no-untyped-def]
    xdist: list[str],
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nsandbox_limits = pids=300 memory=1G\n")
    pytester.makepyfile(
        test_l="""
        import pytest
        from pytest_sandbox.types import Limits

        def test_ini_defaults(sandbox):
            assert sandbox.limits["pids"].value == 300 and sandbox.limits["memory"].value == 1 << 30

        @pytest.mark.sandbox(memory="256M", pids=100, cpus=1, disk="200M")
        def test_marker(sandbox):
            assert (sandbox.limits["pids"].value, sandbox.limits["memory"].value) == (100, 256 << 20)
            assert sandbox.limits["cpus"].value == 1
            assert sandbox.limits["disk"].enforced and sandbox.limits["disk"].value == 200 << 20
            full = sandbox.exec("dd if=/dev/zero of=/tmp/f bs=1M count=400")
            assert "No space left on device" in full.stderr

        @pytest.mark.sandbox(pids=50)
        class TestClass:
            def test_in_class(self, sandbox):
                assert sandbox.limits["pids"].value == 50

        def test_factory(sandbox_factory):
            assert sandbox_factory(limits=Limits(pids=77)).limits["pids"].value == 77

        @pytest.mark.sandbox(memory="128M")
        def test_oom(sandbox):
            sandbox.exec("python3 -c 'b = bytearray(1 << 30); b[::4096] = b\\"x\\" * len(b[::4096])'").check()
        """
    )
    result = run("-W", "ignore::pytest_sandbox.errors.LimitWarning", *xdist)
    result.assert_outcomes(passed=4, failed=1)
    text = result.stdout.str()
    assert "limits: " in text and "memory=128 MiB (" in text
    if "(rlimit RLIMIT_AS" not in text:  # a cgroup holds it: the kernel killed the command
        assert "killed: out of memory, limit 128 MiB" in text


def test_bad_limits_are_usage_errors(pytester: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(
        test_x="""
        import pytest
        @pytest.mark.sandbox(memory="lots")
        def test_x(sandbox):
            pass
        """
    )
    res = run()
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "memory takes a size like '512M'" in res.stderr.str()
    res = run("--sandbox-limits=pids=many", "--co")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--sandbox-limits" in res.stderr.str() and "whole number" in res.stderr.str()


@pytest.mark.parametrize("xdist", XDIST, ids=["serial", "xdist"])
def test_services_are_ready_in_every_test_and_a_failure_shows_their_output(
    pytester: pytest.Pytester,
    run,  # type: ignore[no-untyped-def]
    xdist: list[str],
) -> None:
    pytester.makeconftest(
        """
        import pytest
        from pytest_sandbox import Image

        @pytest.fixture(scope="session")
        def sandbox_image():
            return (Image.host()
                    .run("mkdir -p /srv && echo hello > /srv/index.html")
                    .service("web", start="cd /srv && echo serving; exec python3 -m http.server 8000 --bind 127.0.0.1",
                             ready="python3 -c 'import socket; socket.create_connection((\\"127.0.0.1\\", 8000))'"))
        """
    )
    pytester.makepyfile(
        test_s="""
        import urllib.request
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_each_fork_serves(sandbox, n):
            host, port = sandbox.expose(8000)
            body = urllib.request.urlopen(f"http://{host}:{port}/").read()
            assert body == b"hello\\n"
            sandbox.fs.write("/srv/index.html", f"changed by {n}\\n")  # the next test never sees it
            assert sandbox.services["web"].state == "ready"

        def test_fails(sandbox):
            assert False, "look at the service"
        """
    )
    result = run(*xdist)
    result.assert_outcomes(passed=4, failed=1)
    text = result.stdout.str()
    assert "services: web ready" in text and "web output:" in text and "serving" in text


def test_a_failing_service_is_reported_once_with_its_output(pytester: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    pytester.makeconftest(
        """
        import pytest
        from pytest_sandbox import Image

        @pytest.fixture(scope="session")
        def sandbox_image():
            # It starts while the recipe builds; a later step breaks it for every sandbox.
            return (Image.host()
                    .service("db", start="test ! -e /etc/broken || { echo the-db-$((6*7)); exit 3; };"
                             " touch /dev/shm/up; exec sleep 1000", ready="test -e /dev/shm/up")
                    .run("touch /etc/broken"))
        """
    )
    pytester.makepyfile(
        test_f="""
        import pytest

        @pytest.mark.parametrize("n", range(3))
        def test_uses_db(sandbox, n):
            pass
        """
    )
    result = run()
    result.assert_outcomes(errors=3)
    # Its output once in the errors (pytest's short summary repeats the first message).
    text = result.stdout.str().split("short test summary info")[0]
    assert text.count("the-db-42") == 1, text
    assert text.count("failed earlier in this run") == 2


def test_report_header_names_backend_engine_and_cache(pytester: pytest.Pytester, cache_dir: Path) -> None:
    pytester.makepyfile(test_a="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    who = "as root" if os.geteuid() == 0 else "rootless"
    result.stdout.fnmatch_lines(
        [f"sandbox: backend local (auto): local engine, {who}*bubblewrap *", f"sandbox: cache {cache_dir}"]
    )


def test_relative_copy_paths_resolve_against_the_conftest(pytester: pytest.Pytester, cache_dir: Path) -> None:
    """`pytest sub/` from the parent directory: the conftest's copy("data") is sub/data."""
    sub = pytester.path / "sub"
    (sub / "data").mkdir(parents=True)
    (sub / "data" / "f.txt").write_text("next to the conftest")
    (sub / "conftest.py").write_text(
        "import pytest\nfrom pytest_sandbox import Image\n\n"
        "@pytest.fixture(scope='session')\ndef sandbox_image():\n"
        "    return Image.host().copy('data', '/work/data')\n"
    )
    (sub / "test_a.py").write_text(
        "def test_it(sandbox):\n    assert sandbox.fs.read_text('/work/data/f.txt') == 'next to the conftest'\n"
    )
    result = pytester.runpytest_subprocess(f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", "sub")
    result.assert_outcomes(passed=1)
