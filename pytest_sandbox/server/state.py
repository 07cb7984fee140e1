"""What the Daytona endpoint holds and does, without HTTP: its snapshot and sandbox records, the
snapshots' persistence, the safety-net reaper, and the lifecycle operations on the backend (the
toolbox's are in :mod:`.toolbox`).

Everything here blocks (the backend does) and is safe to call from many threads at once: the app
runs it in a thread pool. A failure the client should hear about is an :class:`ApiError`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import filelock

from ..errors import EngineUnavailableError, SandboxError, SnapshotError, say_once
from ..image import Image
from ..store import write_atomic
from ..types import Backend, Limits, Sandbox
from .dockerfile import dockerfile_image
from .records import DAEMON, ApiError, SandboxRecord, SandboxSpec, SnapshotRecord, network_policy

__all__ = ["EndpointState"]


def _spawn(name: str, work: Callable[[], None]) -> None:
    # Builds take minutes: their own threads, so they never hold the request pool's workers.
    threading.Thread(target=work, daemon=True, name=name).start()


class EndpointState:
    """The endpoint's records and operations over ``backend``. Snapshot records persist in
    ``state_dir/snapshots.json``, merged with what other endpoints on the same directory wrote."""

    def __init__(
        self,
        backend: Backend,
        state_dir: Path,
        *,
        targets: tuple[str, ...] = ("local",),
        default_image: str = "host",
    ) -> None:
        self.backend = backend
        self.targets = targets
        self.default_image = default_image
        # Guards the dicts and sets below; never held across a backend call or disk I/O, so
        # lookups never wait behind slow work.
        self._lock = threading.RLock()
        self._boxes: dict[str, SandboxRecord] = {}
        self._deleted: set[str] = set()
        self._closed = False
        self._state_file = state_dir / "snapshots.json"
        self._snaps: dict[str, SnapshotRecord] = self._load()

    # -- persistence -------------------------------------------------------------------------
    def _exists(self, key: str) -> bool:
        try:
            self.backend.get_snapshot(key)
        except SandboxError:
            return False
        return True

    def _load(self) -> dict[str, SnapshotRecord]:
        try:
            rows = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, SnapshotRecord] = {}
        for row in rows if isinstance(rows, list) else ():
            rec = SnapshotRecord.from_json(row)
            # Snapshots the backend no longer has (pruned from its cache) are gone.
            if rec is not None and rec.state == "active" and rec.key and self._exists(rec.key):
                out[rec.id] = rec
        return out

    def _refresh(self) -> None:
        """Take in snapshots another endpoint on the same state directory recorded."""
        disk = self._load()
        with self._lock:
            for rid, rec in disk.items():
                if rid not in self._deleted and all(r.name != rec.name for r in self._snaps.values()):
                    self._snaps[rid] = rec

    def _save(self) -> None:
        # Merged under a file lock with what is on disk: endpoints may share one directory.
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self._state_file) + ".lock"):
            disk = self._load()
            with self._lock:
                rows = {rid: r for rid, r in disk.items() if rid not in self._deleted}
                rows.update({rid: r for rid, r in self._snaps.items() if r.state == "active"})
                text = json.dumps([r.to_json() for r in rows.values()], indent=1)
            write_atomic(self._state_file, text)

    # -- lookups -----------------------------------------------------------------------------
    def _find_snap(self, id_or_name: str) -> SnapshotRecord | None:
        with self._lock:
            by_id = self._snaps.get(id_or_name)
            return by_id or next((r for r in self._snaps.values() if r.name == id_or_name), None)

    def snapshot(self, id_or_name: str) -> SnapshotRecord:
        """A snapshot by id or name (404 if there is none)."""
        rec = self._find_snap(id_or_name)
        if rec is None:
            self._refresh()
            rec = self._find_snap(id_or_name)
        if rec is None:
            raise ApiError(404, f"Snapshot {id_or_name} not found")
        return rec

    def sandbox(self, id_or_name: str) -> SandboxRecord:
        """A sandbox by id or name (404 if there is none); asking counts as activity."""
        with self._lock:
            box = self._boxes.get(id_or_name)
            box = box or next((b for b in self._boxes.values() if b.name == id_or_name), None)
        if box is None:
            raise ApiError(404, f"Sandbox with ID or name {id_or_name} not found")
        box.activity = time.time()
        return box

    def running(self, sid: str) -> tuple[SandboxRecord, Sandbox]:
        """A started sandbox's record and the backend's sandbox (409 if it is not started)."""
        box = self.sandbox(sid)
        sb = box.sb
        if box.state != "started" or sb is None:
            raise ApiError(409, f"Sandbox {sid} is {box.state}; start it first", source=DAEMON)
        return box, sb

    def _register(self, box: SandboxRecord) -> None:
        with self._lock:
            if self._closed:  # close() has swept: a sandbox made now would outlive the endpoint
                raise ApiError(503, "the endpoint is shutting down")
            if any(b.name == box.name for b in self._boxes.values()):
                raise ApiError(409, f"Sandbox with name {box.name} already exists")
            self._boxes[box.id] = box

    def _unregister(self, box: SandboxRecord) -> None:
        with self._lock:
            self._boxes.pop(box.id, None)

    # -- snapshots ---------------------------------------------------------------------------
    @staticmethod
    def _image(dockerfile: str | None, ref: str) -> Image:
        try:
            # A client's string never names this machine (a host directory as a rootfs, its /usr).
            return dockerfile_image(dockerfile) if dockerfile is not None else Image.from_ref(ref, host_paths=False)
        except (SandboxError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc

    def create_snapshot(
        self,
        name: str,
        image_name: str | None,
        dockerfile: str | None,
        has_context: bool = False,
        sizes: Mapping[str, int | None] | None = None,
    ) -> SnapshotRecord:
        """Start building a snapshot from an image reference or a Dockerfile; it is ``pending``
        until the build thread takes it, then ``building``, then ``active`` or ``build_failed``.
        ``sizes`` (cpu, memory, disk) are those of every sandbox made from it."""
        if has_context:
            raise ApiError(400, "COPY/ADD of local files is not supported by the local Daytona endpoint")
        image = self._image(dockerfile or None, image_name or "")
        rec = SnapshotRecord(id=str(uuid.uuid4()), name=name, image_name=image_name or name)
        _set_sizes(rec, sizes or {})
        with self._lock:
            if any(r.name == name for r in self._snaps.values()):
                raise ApiError(409, f"Snapshot with name {name} already exists")
            self._snaps[rec.id] = rec

        def work() -> None:
            rec.state, rec.updated = "building", time.time()
            try:
                rec.key = self.backend.build(image, on_log=rec.logs.append).key
                rec.state = "active"
                self._save()
            except Exception as exc:  # the client reads it as the snapshot's error reason
                rec.state, rec.error = "build_failed", str(exc)
                rec.logs.append(str(exc))
            rec.updated = time.time()

        _spawn(f"build-{name}", work)
        return rec

    def snapshots(self, name_contains: str = "") -> list[SnapshotRecord]:
        """Every snapshot whose name contains ``name_contains``, oldest first."""
        self._refresh()
        with self._lock:
            rows = [r for r in self._snaps.values() if name_contains in r.name]
        return sorted(rows, key=lambda r: r.created)

    def delete_snapshot(self, id_or_name: str) -> None:
        """Forget a snapshot; the backend's snapshot goes too when it was taken of a sandbox."""
        rec = self.snapshot(id_or_name)
        with self._lock:
            self._snaps.pop(rec.id, None)
            self._deleted.add(rec.id)
            shared = any(r.key == rec.key for r in self._snaps.values())
        # Snapshots built from images are the backend's build cache, shared with its other users
        # (`pytest-sandbox prune` ages them out); only frozen sandboxes are deleted with their name.
        if rec.key and rec.source_sandbox_id and not shared:
            with contextlib.suppress(SandboxError):
                self.backend.remove_snapshot(rec.key)
        self._save()

    # -- sandboxes ---------------------------------------------------------------------------
    def create_sandbox(self, spec: SandboxSpec) -> SandboxRecord:
        """A started sandbox (or a ``pending_build`` one when ``spec.dockerfile`` is given)."""
        target = spec.target or self.targets[0]
        if target not in self.targets:
            raise ApiError(
                400, f"Region {target!r} is not available here; available targets: {', '.join(self.targets)}"
            )
        try:  # checked now: a bad entry is the client's mistake, not a failed start later
            network_policy(spec.network_allow_list, spec.domain_allow_list)
        except SandboxError as exc:
            raise ApiError(400, str(exc)) from exc
        image = self._image(spec.dockerfile, "") if spec.dockerfile is not None else None
        key: str | None = None
        if image is None and spec.snapshot:
            rec = self.snapshot(spec.snapshot)
            if rec.state != "active" or rec.key is None:
                raise ApiError(400, f"Snapshot {spec.snapshot} is {rec.state}; wait until it is active")
            key = rec.key
        sid = str(uuid.uuid4())
        box = SandboxRecord(
            id=sid,
            name=spec.name or sid,
            snapshot=spec.snapshot,
            labels=dict(spec.labels),
            env=dict(spec.env),
            user=spec.user or "root",
            network_block_all=spec.network_block_all,
            network_allow_list=spec.network_allow_list,
            domain_allow_list=spec.domain_allow_list,
            target=target,
            auto_stop=15 if spec.auto_stop is None else spec.auto_stop,
            auto_delete=-1 if spec.auto_delete is None else spec.auto_delete,
        )
        if image is None and spec.snapshot:  # Daytona sizes a sandbox by its snapshot
            box.cpu, box.memory, box.disk = rec.cpu, rec.memory, rec.disk
        _set_sizes(box, {name: getattr(spec, name) for name in ("cpu", "memory", "disk")})
        self._register(box)
        if image is not None:
            box.state = "pending_build"

            def work() -> None:
                try:
                    self._start(box, self.backend.build(image, on_log=box.logs.append).key)
                except Exception as exc:  # the client reads it as the sandbox's error reason
                    box.state, box.error = "build_failed", str(exc)

            _spawn(f"build-{box.id}", work)
            return box
        try:
            self._start(box, key or self._default_key())
        except SandboxError as exc:
            self._unregister(box)
            raise ApiError(500, f"could not start the sandbox: {exc}") from exc
        return box

    def _default_key(self) -> str:
        """The snapshot of sandboxes created without one: ``default_image`` names a snapshot of the
        backend (a key or name), or else a base reference, built once."""
        try:
            return self.backend.get_snapshot(self.default_image).key
        except SandboxError:
            return self.backend.build(Image.from_ref(self.default_image)).key

    def _start(self, box: SandboxRecord, key: str) -> None:
        with box.lock:
            if box.state == "destroyed":  # deleted while its image was building
                return
            limits = Limits(memory=box.memory << 30, cpus=box.cpu, disk=box.disk << 30)
            try:
                box.sb = self.backend.create(key, network=box.network or False, env=box.env, limits=limits)
            except EngineUnavailableError as exc:
                # Daytona's default is a network; where this engine can give none of the sandbox's
                # own (no slirp4netns), a client that asked for nothing more gets no network: never
                # the host's. An allow-list was asked for by name, and fails.
                if box.network is None or box.network.allow:
                    raise
                say_once(f"the endpoint's sandboxes get no network here: {exc}")
                box.sb = self.backend.create(key, network=False, env=box.env, limits=limits)
                box.network_block_all = True
            box.state, box.updated, box.activity = "started", time.time(), time.time()

    def sandboxes(self, labels: dict[str, str]) -> list[SandboxRecord]:
        """The sandboxes carrying all of ``labels``, oldest first."""
        with self._lock:
            boxes = [b for b in self._boxes.values() if all(b.labels.get(k) == v for k, v in labels.items())]
        return sorted(boxes, key=lambda b: b.created)

    def delete_sandbox(self, sid: str) -> SandboxRecord:
        """Delete a sandbox (and the snapshot a stop left); returns its last record."""
        box = self.sandbox(sid)
        self._destroy(box)
        return box

    def _destroy(self, box: SandboxRecord) -> None:
        with box.lock:
            if box.sb is not None:
                box.sb.close()
                box.sb = None
            if box.stopped_key:
                with contextlib.suppress(SandboxError):
                    self.backend.remove_snapshot(box.stopped_key)
                box.stopped_key = None
            box.state, box.updated = "destroyed", time.time()
        self._unregister(box)

    def stop_sandbox(self, sid: str) -> SandboxRecord:
        """Stop a sandbox: like Daytona, its files survive, its processes do not."""
        box = self.sandbox(sid)
        self._stop(box)
        return box

    def _stop(self, box: SandboxRecord) -> None:
        with box.lock:
            if box.sb is None:
                return
            if box.auto_delete == 0:  # ephemeral: deleted as soon as it stops
                self._destroy(box)
                return
            box.stopped_key = box.sb.snapshot().key
            box.sb.close()
            box.sb, box.state, box.updated = None, "stopped", time.time()

    def start_sandbox(self, sid: str) -> SandboxRecord:
        """Start a stopped sandbox from the files it had; a started one stays as it is."""
        box = self.sandbox(sid)
        with box.lock:
            if box.sb is None and box.stopped_key:
                self._start(box, box.stopped_key)
        return box

    def fork_sandbox(self, sid: str, name: str | None) -> SandboxRecord:
        """A new started sandbox from a started one's current files, with its settings."""
        box, sb = self.running(sid)
        cid = str(uuid.uuid4())
        child = SandboxRecord(
            id=cid,
            name=name or cid,
            snapshot=box.snapshot,
            labels=dict(box.labels),
            env=dict(box.env),
            user=box.user,
            network_block_all=box.network_block_all,
            network_allow_list=box.network_allow_list,
            domain_allow_list=box.domain_allow_list,
            target=box.target,
            auto_stop=box.auto_stop,
            auto_delete=box.auto_delete,
            cpu=box.cpu,
            memory=box.memory,
            disk=box.disk,
        )
        self._register(child)
        # The child's lock first: a delete of the child waits for its sandbox, then closes it.
        with child.lock:
            if child.state == "destroyed":  # deleted before it existed
                return child
            try:
                with box.lock:
                    child.sb = _fork(sb)
            except SandboxError as exc:
                self._unregister(child)
                raise ApiError(500, f"fork failed: {exc}") from exc
            child.state, child.updated = "started", time.time()
        return child

    def snapshot_sandbox(self, sid: str, name: str) -> SandboxRecord:
        """Record a started sandbox's current files as a snapshot named ``name``."""
        box, sb = self.running(sid)
        with self._lock:
            if any(r.name == name for r in self._snaps.values()):
                raise ApiError(409, f"Snapshot with name {name} already exists")
            rec = SnapshotRecord(id=str(uuid.uuid4()), name=name, image_name=name, source_sandbox_id=box.id)
            rec.cpu, rec.memory, rec.disk = box.cpu, box.memory, box.disk  # its sandboxes' sizes
            self._snaps[rec.id] = rec
        try:
            with box.lock:
                rec.key = sb.snapshot().key
        except SandboxError as exc:
            with self._lock:
                self._snaps.pop(rec.id, None)
            raise ApiError(500, f"snapshot failed: {exc}") from exc
        rec.state, rec.updated = "active", time.time()
        self._save()
        return box

    def set_labels(self, sid: str, labels: dict[str, str]) -> dict[str, str]:
        """Replace a sandbox's labels."""
        box = self.sandbox(sid)
        box.labels = dict(labels)
        return box.labels

    def set_interval(self, sid: str, what: str, minutes: int) -> None:
        """Set the ``autostop`` or ``autodelete`` interval (minutes) of a sandbox."""
        box = self.sandbox(sid)
        if what == "autostop":
            box.auto_stop = minutes
        else:
            box.auto_delete = minutes

    def reap(self, now: float | None = None) -> None:
        """The safety net Daytona gives idle sandboxes: stop them after ``auto_stop`` idle
        minutes, and delete them ``auto_delete`` minutes after they stopped (0: at once)."""
        now = time.time() if now is None else now
        with self._lock:
            boxes = list(self._boxes.values())
        for box in boxes:
            with contextlib.suppress(Exception):  # one sandbox's failure must not end the sweep
                if box.state == "started" and box.auto_stop > 0 and now - box.activity > box.auto_stop * 60:
                    self._stop(box)
                elif box.state == "stopped" and box.auto_delete >= 0 and now - box.updated > box.auto_delete * 60:
                    self._destroy(box)

    def close(self) -> None:
        """Delete every sandbox (snapshots stay)."""
        with self._lock:
            self._closed = True
            boxes = list(self._boxes.values())
        for box in boxes:
            with contextlib.suppress(Exception):  # the others must still go
                self._destroy(box)


def _set_sizes(rec: SnapshotRecord | SandboxRecord, sizes: Mapping[str, int | None]) -> None:
    """Set the cpu, memory and disk a request gave (whole cores and GiB, at least 1)."""
    for name in ("cpu", "memory", "disk"):
        value = sizes.get(name)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"{name} must be at least 1, got {value}")
            setattr(rec, name, value)


def _fork(sb: Sandbox) -> Sandbox:
    """A fork that keeps the sandbox's running processes where the engine can (a live fork: the
    local engine as root with CRIU), else one of its files, as Daytona's fork of a started
    sandbox is."""
    try:
        return sb.fork(live=True)
    except (EngineUnavailableError, SnapshotError):
        return sb.fork()
