"""The warm pool: sandboxes started ahead of time for snapshots that are forked again and again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ..types import Snapshot

__all__ = ["WarmPool"]


class _Spare(Protocol):
    def alive(self) -> bool: ...
    def close(self) -> None: ...


S = TypeVar("S", bound=_Spare)


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
