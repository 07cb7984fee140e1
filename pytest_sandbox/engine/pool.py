"""The warm pool: sandboxes started ahead of time for snapshots that are forked again and again."""

from __future__ import annotations

import os
import threading
import time
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

    A snapshot forked a second time gets a pre-started sandbox (network off, the default, and
    its services ready) waiting for its next create(), refilled by background threads: what a
    test suite sees as fork time is then only the handover. A create() that finds none ready
    asks for one more to be kept for that snapshot, up to ``max_depth``; at most ``max_spares``
    wait or are being started at once over all snapshots, so the pool never holds more live
    services than a machine of this size can run. One-off snapshots (a search tree's nodes)
    never pay for a spare.
    """

    HOT_AFTER = 2

    def __init__(self, start: Callable[[Snapshot], S], max_depth: int = 4, max_spares: int | None = None) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._ready: dict[str, list[S]] = {}
        self._uses: dict[str, int] = {}
        self._depth: dict[str, int] = {}
        self._filling: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._fills: set[threading.Thread] = set()
        self._closed = False
        cores = os.cpu_count() or 1
        self.max_depth = max_depth
        self.max_spares = max_spares if max_spares is not None else max(2, min(8, 2 * cores))
        # Starts run side by side up to the number of cores: more only queue for the CPU.
        self._parallel = max(1, min(cores, 4))

    def take(self, snap: Snapshot) -> S | None:
        key = snap.key
        evicted: list[S] = []
        with self._lock:
            self._uses[key] = uses = self._uses.get(key, 0) + 1
            self._last[key] = time.monotonic()
            ready = self._ready.get(key, [])
            sb = ready.pop(0) if ready else None
            starts = 0
            if uses >= self.HOT_AFTER and not self._closed:
                depth = self._depth.get(key, 1)
                if sb is None and uses > self.HOT_AFTER:  # a miss on a hot snapshot: keep one more
                    depth = self._depth[key] = min(depth + 1, self.max_depth)
                filling = self._filling.get(key, 0)
                want = max(0, min(depth - len(ready) - filling, self._parallel - filling))
                held = sum(len(x) for x in self._ready.values()) + sum(self._filling.values())
                # No room: the spares of the snapshot used longest ago make way (one suite moves on
                # from one image to the next; its old spares would hold the pool for nothing).
                while held + want > self.max_spares and (victim := self._stalest(key)) is not None:
                    evicted.append(self._ready[victim].pop())
                    self._depth[victim] = max(1, self._depth.get(victim, 1) - 1)
                    held -= 1
                starts = max(0, min(want, self.max_spares - held))
                self._filling[key] = filling + starts
            threads = [
                threading.Thread(target=self._fill, args=(snap,), daemon=True, name="sandbox-pool")
                for _ in range(starts)
            ]
            self._fills.update(threads)
        for old in evicted:
            old.close()
        if sb is not None and not sb.alive():  # died while waiting: do not hand it out
            sb.close()
            sb = None
        for t in threads:
            try:
                t.start()
            except RuntimeError:  # no thread to be had (the user's process limit): one spare less
                with self._lock:
                    self._fills.discard(t)
                    self._filling[key] -= 1
        return sb

    def _stalest(self, but: str) -> str | None:
        """The snapshot other than ``but`` with spares waiting that was taken from longest ago."""
        keys = [k for k, ready in self._ready.items() if ready and k != but]
        return min(keys, key=lambda k: self._last.get(k, 0.0)) if keys else None

    def _fill(self, snap: Snapshot) -> None:
        key = snap.key
        while True:
            try:
                sb: S | None = self._start(snap)
            except Exception:  # the next create() reports the problem itself, in the caller's thread
                sb = None
            with self._lock:
                if sb is not None and not self._closed:
                    self._ready.setdefault(key, []).append(sb)
                    sb = None
                ready = self._ready.get(key, [])
                held = sum(len(x) for x in self._ready.values()) + sum(self._filling.values())
                again = (
                    not self._closed
                    and sb is None
                    and len(ready) + self._filling[key] - 1 < self._depth.get(key, 1)
                    and held - 1 < self.max_spares
                )
                if not again:
                    self._filling[key] -= 1
                    self._fills.discard(threading.current_thread())
            if sb is not None:
                sb.close()
            if not again:
                return

    def close(self) -> None:
        """Close the spares, after the ones being started: a start that finished after close()
        would hold its cgroup and disk past the backend's own clean-up."""
        with self._lock:
            self._closed = True
            fills = list(self._fills)
        for t in fills:
            if t.ident is not None:  # started
                t.join(timeout=60)
        with self._lock:
            spares = [sb for ready in self._ready.values() for sb in ready]
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
        """Discard the spares, after the one being made (it is discarded as it finishes)."""
        with self._lock:
            self._closed = True
            spares, self._ready = self._ready, []
            thread = self._thread
        self._wanted.set()
        for item in spares:
            self._discard(item)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
