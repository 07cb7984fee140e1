"""Per-test forks: every test gets its own copy-on-write sandbox of the session's snapshot."""

from __future__ import annotations

import pytest

from pytest_sandbox import Sandbox

FETCH = (
    "python3 - <<'PY'\n"
    "import time, urllib.request\n"
    "for _ in range(100):\n"
    "    try:\n"
    "        print(urllib.request.urlopen('http://127.0.0.1:8000/').read().decode().strip()); break\n"
    "    except OSError:\n"
    "        time.sleep(0.05)\n"
    "PY"
)


def test_project_tests_fail_before_the_fix(sandbox: Sandbox) -> None:
    result = sandbox.exec("python3 -m unittest -q 2>&1", cwd="/work/project/tests", env={"PYTHONPATH": ".."})
    assert result.exit_code == 1
    assert "FAILED (failures=2)" in result.stdout


@pytest.mark.parametrize("attempt", range(3))
def test_writes_do_not_leak_between_tests(sandbox: Sandbox, attempt: int) -> None:
    # Each run starts from the same frozen state, whatever the other tests wrote.
    assert not sandbox.fs.exists("/work/project/scratch.txt")
    sandbox.fs.write("/work/project/scratch.txt", f"attempt {attempt}")
    sandbox.exec("rm -rf /work/project/tests").check()


def test_a_service_in_the_background(sandbox: Sandbox) -> None:
    sandbox.exec("python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 &").check()
    assert "tests" in sandbox.exec(FETCH, timeout=30).stdout


def test_no_network_but_loopback(sandbox: Sandbox) -> None:
    interfaces = sandbox.exec("cat /proc/net/dev").stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]
