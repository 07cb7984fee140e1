"""The warm pool's policy (pure logic: fake sandboxes, the real threads)."""

from __future__ import annotations

import threading

from pytest_sandbox.engine.pool import WarmPool
from pytest_sandbox.types import Snapshot
from tests.conftest import wait_for


class Fake:
    def __init__(self, key: str) -> None:
        self.key = key
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


GATE = threading.Event()  # starts wait here: takes meanwhile all miss


def make_pool(max_spares: int = 4) -> tuple[WarmPool[Fake], list[Fake]]:
    made: list[Fake] = []
    lock = threading.Lock()

    def start(snap: Snapshot) -> Fake:
        GATE.wait()
        sb = Fake(snap.key)
        with lock:
            made.append(sb)
        return sb

    return WarmPool(start, max_depth=3, max_spares=max_spares), made


def ready(pool: WarmPool[Fake], key: str) -> int:
    return len(pool._ready.get(key, []))


def test_a_snapshot_that_runs_dry_gets_more_spares_up_to_the_depth() -> None:
    GATE.clear()
    pool, _ = make_pool()
    a = Snapshot(key="a", backend="fake")
    assert pool.take(a) is None  # first use: one-off until proven otherwise
    for _ in range(6):  # hot now, and every take misses while starts are slow
        assert pool.take(a) is None
    assert pool._depth["a"] == 3  # grown by the misses, up to max_depth
    GATE.set()
    assert wait_for(lambda: ready(pool, "a") == 3)
    assert pool.take(a) is not None
    pool.close()


def test_spares_of_a_snapshot_no_longer_used_make_way() -> None:
    GATE.clear()
    pool, made = make_pool(max_spares=2)
    a, b = Snapshot(key="a", backend="fake"), Snapshot(key="b", backend="fake")
    for _ in range(5):
        pool.take(a)
    GATE.set()
    assert wait_for(lambda: ready(pool, "a") == 2)  # as many as the pool may hold in all
    handed = [pool.take(b) for _ in range(4)]
    assert wait_for(lambda: ready(pool, "b") >= 1)
    assert ready(pool, "a") + ready(pool, "b") + sum(pool._filling.values()) <= 2
    assert any(sb.closed and sb.key == "a" for sb in made)  # evicted spares are closed
    pool.close()
    assert all(sb.closed for sb in made if sb not in handed)  # handed-out ones are the caller's
