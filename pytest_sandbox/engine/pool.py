"""The warm pool: sandboxes started ahead of time for snapshots that are forked again and again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ..types import Snapshot

__all__ = ["Spares", "WarmPool"]


class _Spare(Protocol):
    def alive(self) -> bool: ...
    def close(self) -> None: ...


S = TypeVar("S", bound=_Spare)
T = TypeVar("T")


class WarmPool(Generic[S]):
    """Sandboxes started ahead of time for snapshots that are forked again and again.

    A snapshot forked a second time gets one pre-started sandbox (network off, the default)
    waiting for its next create(), refilled by a background thread: what a test suite sees as
    fork time is then only the handover. One-off snapshots (a search tree's nodes) never pay
    for a spare.
    """

    HOT_AFTER = 2

    def __init__(self, start: Callable[[Snapshot], S]) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._ready: dict[str, S] = {}
        self._uses: dict[str, int] = {}
        self._pending: set[str] = set()
        self._closed = False

    def take(self, snap: Snapshot) -> S | None:
        with self._lock:
            self._uses[snap.key] = uses = self._uses.get(snap.key, 0) + 1
            sb = self._ready.pop(snap.key, None)
            refill = uses >= self.HOT_AFTER and snap.key not in self._pending and not self._closed
            if refill:
                self._pending.add(snap.key)
        if sb is not None and not sb.alive():  # died while waiting: do not hand it out
            sb.close()
            sb = None
        if refill:
            threading.Thread(target=self._fill, args=(snap,), daemon=True, name="sandbox-pool").start()
        return sb

    def _fill(self, snap: Snapshot) -> None:
        try:
            sb = self._start(snap)
        except Exception:  # the next create() reports the problem itself, in the caller's thread
            sb = None
        with self._lock:
            self._pending.discard(snap.key)
            if sb is not None and not self._closed and snap.key not in self._ready:
                self._ready[snap.key] = sb
                sb = None
        if sb is not None:
            sb.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares = list(self._ready.values())
            self._ready.clear()
        for sb in spares:
            sb.close()


class Spares(Generic[T]):
    """Things made ahead of need (each sandbox's cgroup with its helper already inside): take()
    hands one over at once and a background thread makes the next, so what costs milliseconds to
    make is off the path of create(). Without a spare, take() makes one there and then."""

    def __init__(self, make: Callable[[], T], discard: Callable[[T], None], keep: int = 2) -> None:
        self._make = make
        self._discard = discard
        self._keep = keep
        self._ready: list[T] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def take(self) -> T:
        with self._lock:
            item = self._ready.pop() if self._ready else None
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._fill, daemon=True, name="sandbox-spares")
                self._thread.start()
        self._wanted.set()
        return self._make() if item is None else item

    def _fill(self) -> None:
        while self._wanted.wait():
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self._keep:
                        break
                try:
                    item = self._make()
                except Exception:  # the next take() makes its own and reports the problem
                    break
                with self._lock:
                    if not self._closed:
                        self._ready.append(item)
                        continue
                self._discard(item)
                return
            if self._closed:
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares, self._ready = self._ready, []
        self._wanted.set()
        for item in spares:
            self._discard(item)
