"""worker_sandbox: one sandbox per xdist worker, shared by that worker's tests (cheapest)."""

from __future__ import annotations

import pytest

from pytest_sandbox import Sandbox


@pytest.mark.parametrize("n", range(4))
def test_shared_per_worker(worker_sandbox: Sandbox, n: int) -> None:
    worker_sandbox.exec(f"echo {n} >> /tmp/seen").check()
    seen = worker_sandbox.fs.read_text("/tmp/seen").split()
    assert str(n) in seen  # tests on the same worker see each other's writes


def test_branching_inside_a_test(sandbox: Sandbox, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox.exec("echo base > /tmp/state").check()
    point = sandbox.snapshot()
    left, right = sandbox_factory(point), sandbox_factory(point)
    left.exec("echo left > /tmp/state").check()
    assert right.fs.read_text("/tmp/state") == "base\n"
    assert left.fs.read_text("/tmp/state") == "left\n"
