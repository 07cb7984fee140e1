"""One test run's use of a backend: snapshots per setup key, forks, kept sandboxes, statistics.

Core module: no pytest import. The pytest plugin wraps one :class:`SessionManager` per process
(per xdist worker); the run-wide parts (one build per key, one report of a failed build) go
through the snapshot store's locks and files, so they hold across workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from .backends import describe_backend, open_backend, resolve_backend
from .errors import ConfigError, SandboxError, ServiceError, SnapshotBuildError, say_once
from .image import Image
from .store import format_age
from .types import Backend, Limits, Network, Sandbox, Snapshot

__all__ = ["KEEP_CHOICES", "SessionManager"]

KEEP_CHOICES = ("never", "failed", "always")


@dataclass
class Stats:
    """What one process did; merged across xdist workers for the summary line."""

    built: int = 0
    reused: int = 0
    pulled: int = 0
    forks: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"built": self.built, "reused": self.reused, "pulled": self.pulled, "forks": self.forks}

    def merge(self, data: Mapping[str, Any]) -> None:
        self.built += int(data.get("built", 0))
        self.reused += int(data.get("reused", 0))
        self.pulled += int(data.get("pulled", 0))
        self.forks.extend(float(x) for x in data.get("forks", ()))

    def summary(self) -> str:
        med = f", median fork {statistics.median(self.forks) * 1000:.1f} ms" if self.forks else ""
        pulled = f", {self.pulled} pulled" if self.pulled else ""
        return (
            f"sandbox: {self.built} snapshots built{pulled}, {self.reused} reused, "
            f"{len(self.forks)} sandboxes forked{med}"
        )


HEARTBEAT = 10.0
"""Seconds a build step runs before a "still running" line says so (and again each time after)."""


class _Progress:
    """One build's progress: each step's line with its own duration when it ends (verbose), a
    "still running" line while a step takes long (so a slow base is never silent), and how many
    steps were really built."""

    def __init__(
        self, key: str, total: int, say: Callable[[str], None], verbose: bool, heartbeat: float = HEARTBEAT
    ) -> None:
        self.key, self.total, self.say, self.verbose, self.heartbeat = key[:12], total, say, verbose, heartbeat
        self.started = time.perf_counter()
        self.step: tuple[str, float] | None = None
        self.base = False
        self.steps = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._due = heartbeat  # seconds into the current step of the next "still running" line

    def begin(self, header: str) -> None:
        """A step header, ``[i/n] DESCRIPTION``: the previous step has ended."""
        with self._lock:
            self._end_locked()
            self.step = (header, time.perf_counter())
            self._due = self.heartbeat
            if header.startswith("[0/"):
                self.base = True
            else:
                self.steps += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="sandbox-progress")
            self._thread.start()

    def _end_locked(self) -> None:
        if self.step is not None and self.verbose:
            header, t0 = self.step
            self.say(f"sandbox: {self.key} {header} ({time.perf_counter() - t0:.1f}s)")
        self.step = None

    def _beat(self) -> None:
        while not self._stop.wait(min(0.5, self.heartbeat / 4)):
            with self._lock:
                if self.step is None:
                    continue
                header, t0 = self.step
                elapsed = time.perf_counter() - t0
                if elapsed >= self._due:
                    self.say(f"sandbox: building {self.key} {header}: still running ({elapsed:.0f}s)")
                    self._due += self.heartbeat

    @property
    def built(self) -> bool:
        return self.base or self.steps > 0

    def close(self) -> str:
        """End the last step; returns what was built, e.g. "the base and 2 of 3 steps"."""
        self._stop.set()
        with self._lock:
            self._end_locked()
        if self._thread is not None:
            self._thread.join()
        of = f"{self.steps} of {self.total} step{'s' if self.total != 1 else ''}"
        return " and ".join((["the base"] if self.base else []) + ([of] if self.steps else []))


class SessionManager:
    """Builds each setup key once per run and forks sandboxes for tests."""

    def __init__(
        self,
        *,
        backend: str = "auto",
        cache_dir: str | None = None,
        rebuild: bool = False,
        limits: Limits | None = None,
        max_memory: int | None = None,
        run_id: str = "",
        run_start: float | None = None,
        log: Callable[[str], None] = print,
        cache_from: str | None = None,
        cache_to: str | None = None,
        verbosity: int = 0,
    ) -> None:
        self.verbosity = verbosity
        self.backend_name = backend
        self.cache_from = cache_from
        self.cache_to = cache_to
        self.cache_dir = cache_dir
        self.rebuild = rebuild
        self.limits = limits
        self.max_memory = max_memory
        self.run_id = run_id
        self.run_start = run_start if run_start is not None else time.time()
        self.log = log
        self.stats = Stats()
        self._backend: Backend | None = None
        self._snapshots: dict[str, Snapshot] = {}
        self._failures: dict[str, SnapshotBuildError | str] = {}
        self._reported: set[str] = set()
        self._service_failed: set[str] = set()  # snapshots whose services failed, shown once
        self.kept: list[tuple[str, Snapshot]] = []

    def header(self) -> list[str]:
        """What this run will use, for pytest's report header (nothing is opened)."""
        from .store import default_cache_dir

        try:
            name = self.resolved_name()
            what = describe_backend(name)
        except SandboxError as exc:
            name, what = self.backend_name, f"unusable here: {exc}"
        cache = self.cache_dir or str(default_cache_dir())
        lines = [f"sandbox: backend {name}" + (" (auto)" if self.backend_name == "auto" else "") + f": {what}"]
        lines.append(f"sandbox: cache {cache}")
        if self.cache_from or self.cache_to:
            lines.append(f"sandbox: cache-from {self.cache_from or '-'}, cache-to {self.cache_to or '-'}")
        return lines

    def resolved_name(self) -> str:
        """The backend this run uses (``auto`` resolved), without opening it."""
        return self._backend.name if self._backend is not None else resolve_backend(self.backend_name)

    @property
    def backend(self) -> Backend:
        """The backend, opened on first use (a run that needs no sandbox never opens one)."""
        if self._backend is None:
            name = resolve_backend(self.backend_name)
            # Every backend keeps its build locks (and the remote ones their records) there.
            options: dict[str, Any] = {"cache_dir": self.cache_dir, "limits": self.limits}
            if name == "local":  # all sandboxes of the run (every worker's) in one cgroup, capped
                options.update(max_memory=self.max_memory, run=self.run_id)
            elif self.max_memory is not None:
                say_once(f"--sandbox-max-memory is held by the local engine only: the {name} backend ignores it")
            self._backend = open_backend(name, **options)
        return self._backend

    def _failure_file(self, key: str) -> Path | None:
        store = getattr(self.backend, "store", None)
        return None if store is None else Path(store.root) / "k" / f"{key}.failed.json"

    def snapshot(self, image: Image) -> Snapshot:
        """The snapshot of ``image``: built once per key per run, reused from earlier runs."""
        if not isinstance(image, Image):
            raise ConfigError(f"expected a pytest_sandbox.Image, got {type(image).__name__}")
        key = image.key
        if key in self._snapshots:
            return self._snapshots[key]
        if key in self._failures:
            raise self._failure(key)
        marker = self._failure_file(key)
        # Workers of one run take turns on a key (a lock beside the backend's own build lock), so
        # that a failed build is tried and reported once per run, not once per worker.
        guard = filelock.FileLock(str(marker) + ".lock") if marker is not None else contextlib.nullcontext()
        with guard:
            return self._snapshot_locked(image, key, marker)

    def _snapshot_locked(self, image: Image, key: str, marker: Path | None) -> Snapshot:
        if marker is not None and self.run_id:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(marker.read_text())
                if data.get("run") == self.run_id:  # another worker of this run already failed it
                    self._failures[key] = str(data["message"])
                    self._reported.add(key)
        if key in self._failures:
            raise self._failure(key)
        start = time.perf_counter()
        steps = len(image.steps)
        quiet = self.verbosity < 0
        say = (lambda _line: None) if quiet else self.log
        progress = _Progress(key, steps, say, verbose=self.verbosity > 0)
        pulled = [False]

        def on_log(line: str) -> None:
            if line.startswith("["):  # a step header: "[n/m] DESCRIPTION"
                progress.begin(line)
            elif line.startswith("pulled "):
                pulled[0] = True
                say(f"sandbox: {line}")
            elif line.startswith("cache-from ") and self._first_in_run(line):
                self.log(f"sandbox: {line}")  # even with -q: the run is slower than it should be

        rebuild: bool | float = self.run_start if self.rebuild else False
        try:
            snap = self.backend.build(image, on_log=on_log, rebuild=rebuild, cache_from=self.cache_from)
        except SnapshotBuildError as exc:
            progress.close()
            self._failures[key] = exc
            self._reported.add(key)  # this raise shows the output; later ones refer to it
            if marker is not None and self.run_id:
                with contextlib.suppress(OSError):
                    marker.write_text(json.dumps({"run": self.run_id, "message": str(exc)}))
            raise
        except BaseException:
            progress.close()
            raise
        what = progress.close()
        if progress.built:
            self.stats.built += 1
            say(f"sandbox: snapshot {key[:12]} built in {time.perf_counter() - start:.1f}s ({what})")
            if self.cache_to:
                self._push(snap)
        elif pulled[0]:
            self.stats.pulled += 1
        else:
            self.stats.reused += 1
            say(f"sandbox: snapshot {key[:12]} reused (built {format_age(time.time() - snap.created)} ago)")
        self._snapshots[key] = snap
        return snap

    def _first_in_run(self, message: str) -> bool:
        """True for the first worker of this run to say ``message`` (a marker file per run)."""
        store = getattr(self.backend, "store", None)
        if store is None or not self.run_id:
            return True
        digest = hashlib.sha256(message.encode()).hexdigest()[:16]
        try:
            os.close(os.open(Path(store.root) / "k" / f"{self.run_id}.said.{digest}", os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        except OSError:
            return True
        return True

    def _push(self, snap: Snapshot) -> None:
        """``--sandbox-cache-to``: share what this run built. A push that fails is said, and the
        run goes on (its tests do not depend on the cache)."""
        assert self.cache_to is not None
        try:
            self.backend.push(snap, self.cache_to, on_log=lambda line: self.log(f"sandbox: {line}"))
        except SandboxError as exc:
            self.log(f"sandbox: cache-to {self.cache_to}: pushing {snap.short} failed: {exc}")

    def _failure(self, key: str) -> SandboxError:
        """A build failure, with its full output the first time only."""
        err = self._failures[key]
        if key in self._reported:
            first = str(err).splitlines()[0]
            return SandboxError(
                f"snapshot {key[:12]} failed to build earlier in this run: {first} (its output is shown once, above)"
            )
        self._reported.add(key)
        return err if isinstance(err, SandboxError) else SandboxError(err)

    def create(
        self,
        what: Snapshot | Image,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> Sandbox:
        """Fork a sandbox (timed for the summary line)."""
        snap = self.snapshot(what) if isinstance(what, Image) else what
        start = time.perf_counter()
        try:
            sb = self.backend.create(snap, network=network, env=env, limits=limits)
        except ServiceError as exc:
            # Its output once (the first test that hit it); the later ones refer to that.
            if snap.key in self._service_failed:
                raise SandboxError(
                    f"service {exc.name!r} of snapshot {snap.short} failed earlier in this run: "
                    f"{exc.reason.removesuffix(' (as before)')} "
                    "(its output is shown once, above)"
                ) from None
            self._service_failed.add(snap.key)
            raise
        self.stats.forks.append(time.perf_counter() - start)
        return sb

    def keep(self, sandbox: Sandbox, label: str) -> Snapshot:
        """Freeze a sandbox that should be kept for inspection and remember it for the report."""
        snap = sandbox.snapshot(name=f"kept:{label}")
        self.kept.append((label, snap))
        return snap

    def gc(self, *, wait: bool = True) -> int:
        """Remove what crashed processes (e.g. killed xdist workers) left behind; ``wait=False``
        skips the cache's part while another process holds it (a download), see :meth:`Store.gc`."""
        if self._backend is None and self.backend_name in ("auto", "local"):
            from .store import Store

            return Store(self.cache_dir).gc(wait=wait)
        return self.backend.gc(wait=wait)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
