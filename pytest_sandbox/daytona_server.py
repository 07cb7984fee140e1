"""A Daytona-compatible API on localhost, backed by the local engine (``pytest-sandbox serve --daytona``).

The unmodified ``daytona`` SDK talks to it over HTTP: every response is built from the SDK's own API
models (``daytona_api_client`` and ``daytona_toolbox_api_client``), so what the SDK accepts here it
accepts from Daytona. Daytona-SDK code and agent experiments run offline and free against local
sandboxes, and the daytona backend of pytest-sandbox is tested against it.

Covered (REST under ``/api``, the toolbox under ``/toolbox/<sandbox id>``):

- snapshots: create from an image reference or a declarative image (FROM, RUN, ENV, WORKDIR),
  get, list, delete, build logs;
- sandboxes: create (from a snapshot, an image, or the default), get, list with a label filter,
  delete, start, stop, fork, create_snapshot, labels, auto-stop and auto-delete intervals;
- toolbox: ``process/execute``, and files (bulk upload and download, info, list, create folder,
  delete, move, permissions).

Not covered: sessions, PTY, git, LSP, code interpreter, computer use, volumes, previews, and the
socket.io event stream (the SDK falls back to polling). Image references resolve as the plugin's
marker resolves them: ``host`` is the host's /usr and /etc, ``debian:SUITE`` a Debian minbase built
locally with mmdebstrap, anything else a registry image.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import re
import secrets
import shlex
import stat as st
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import filelock

from .backends.local import LocalBackend, LocalSandbox
from .errors import ConfigError, EngineUnavailableError, ExecTimeoutError, SandboxError, SandboxFileError
from .image import Image

image_from_ref = Image.from_ref
from .store import write_atomic
from .types import Snapshot

__all__ = ["DaytonaServer", "dockerfile_image"]

API = "DAYTONA_API"
DAEMON = "DAYTONA_DAEMON"
_SHELLS = ("/usr/bin/zsh", "/bin/zsh", "/bin/bash", "/usr/bin/bash", "/bin/sh")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, source: str = API) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.source = status, message, code, source

    def body(self, method: str = "", path: str = "") -> dict[str, Any]:
        """The error envelope Daytona's API and daemon answer with (the toolbox's ErrorResponse)."""
        out: dict[str, Any] = {
            "statusCode": self.status,
            "message": self.message,
            "source": self.source,
            "path": path,
            "method": method,
            "timestamp": _iso(time.time()),
        }
        if self.code:
            out["code"] = self.code
        return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def dockerfile_image(text: str) -> Image:
    """The recipe a declarative Daytona image (its Dockerfile) describes: FROM, RUN, ENV, WORKDIR.

    COPY and ADD need Daytona's object storage for their context and are refused with a clear error.
    """
    image: Image | None = None
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            image = image_from_ref(rest.split()[0])
            continue
        if image is None:
            raise ConfigError(f"the image must start with FROM, not {line!r}")
        if op == "RUN":
            image = image.run(rest)
        elif op == "ENV":
            words = shlex.split(rest)
            if len(words) == 2 and "=" not in words[0]:
                image = image.env(**{words[0]: words[1]})
            else:
                image = image.env(**dict(w.split("=", 1) for w in words))
        elif op == "WORKDIR":
            image = image.workdir(rest)
        elif op in ("CMD", "ENTRYPOINT", "LABEL", "USER", "EXPOSE", "SHELL", "ARG"):
            continue  # metadata only: sandboxes here run commands through the toolbox
        else:
            raise ConfigError(f"{op} is not supported by the local Daytona endpoint (FROM, RUN, ENV, WORKDIR are)")
    if image is None:
        raise ConfigError("the image has no FROM line")
    return image


@dataclass
class _SnapRec:
    id: str
    name: str
    image_name: str
    state: str = "pending"
    key: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    error: str | None = None
    source_sandbox_id: str | None = None
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "logs"}


@dataclass
class _Box:
    id: str
    name: str
    snapshot: str | None
    labels: dict[str, str]
    env: dict[str, str]
    user: str
    network_block_all: bool
    target: str
    auto_stop: int
    auto_delete: int
    sb: LocalSandbox | None = None
    state: str = "creating"
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    activity: float = field(default_factory=time.time)
    stopped_key: str | None = None
    shell: str | None = None
    logs: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)


class DaytonaServer:
    """The Daytona-compatible endpoint. ``serve_forever()`` answers until ``shutdown()``.

    ``api_key``: the bearer token every request must carry (a random one when not given): sandboxes
    with a network reach this port on loopback, and must not drive other sandboxes through it.
    ``rate_limit``: requests per second the REST API allows before answering 429, to exercise
    clients' back-off as Daytona's limits would.
    """

    def __init__(
        self,
        backend: LocalBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        targets: tuple[str, ...] = ("local",),
        rate_limit: float | None = None,
        default_image: str = "host",
    ) -> None:
        try:
            import daytona_api_client as models
            import daytona_toolbox_api_client as tmodels
        except ImportError as exc:
            raise EngineUnavailableError(
                "the Daytona endpoint builds its answers from the SDK's models: pip install 'pytest-sandbox[daytona]'"
            ) from exc
        self.m, self.t = models, tmodels
        self.backend = backend
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.targets = targets
        self.default_image = default_image
        self._rate = rate_limit
        self._tokens = rate_limit or 0.0
        self._tokens_at = time.monotonic()
        self._lock = threading.RLock()
        self._boxes: dict[str, _Box] = {}
        self._state_file = backend.store.cache_dir / "daytona-endpoint" / "snapshots.json"
        self._deleted: set[str] = set()
        self._snaps: dict[str, _SnapRec] = self._load()
        _ = backend.userns  # made once, before concurrent requests race to make it
        app = self

        class Handler(_Handler):
            server_app = app

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._routes = self._route_table()
        self._stop = threading.Event()
        threading.Thread(target=self._reaper, daemon=True, name="daytona-reaper").start()

    @property
    def api_url(self) -> str:
        """What clients set as DAYTONA_API_URL."""
        return self.url + "/api"

    def serve_forever(self) -> None:
        """Answer requests until :meth:`shutdown`."""
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop answering and delete every sandbox (snapshots stay)."""
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for box in list(self._boxes.values()):
            self._destroy(box)

    # -- persistence -------------------------------------------------------------------------
    def _load(self) -> dict[str, _SnapRec]:
        try:
            rows = json.loads(self._state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        out = {}
        for row in rows:
            rec = _SnapRec(**row)
            # Snapshots whose files were pruned from the engine's cache are gone.
            if rec.state == "active" and rec.key and self.backend.store.get(rec.key) is not None:
                out[rec.id] = rec
        return out

    def _refresh(self) -> None:
        """Take in snapshots another endpoint on the same cache directory recorded."""
        disk = self._load()
        with self._lock:
            for rid, rec in disk.items():
                if rid not in self._deleted and all(r.name != rec.name for r in self._snaps.values()):
                    self._snaps[rid] = rec

    def _save(self) -> None:
        # Merged under a lock with what is on disk: endpoints may share one cache directory.
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self._state_file) + ".lock"), self._lock:
            rows = {rid: r for rid, r in self._load().items() if rid not in self._deleted}
            rows.update({rid: r for rid, r in self._snaps.items() if r.state == "active"})
            write_atomic(self._state_file, json.dumps([r.to_json() for r in rows.values()], indent=1))

    # -- models ------------------------------------------------------------------------------
    def _snap_json(self, rec: _SnapRec) -> dict[str, Any]:
        dto = self.m.SnapshotDto(
            id=rec.id,
            general=False,
            name=rec.name,
            image_name=rec.image_name,
            state=self.m.SnapshotState(rec.state),
            size=None,
            entrypoint=None,
            cpu=1,
            gpu=0,
            mem=1,
            disk=10,
            error_reason=rec.error,
            created_at=datetime.fromtimestamp(rec.created, timezone.utc),
            updated_at=datetime.fromtimestamp(rec.updated, timezone.utc),
            last_used_at=None,
            source_sandbox_id=rec.source_sandbox_id,
        )
        out: dict[str, Any] = json.loads(dto.to_json())
        return out

    def _box_fields(self, box: _Box) -> dict[str, Any]:
        return {
            "id": box.id,
            "organization_id": "local",
            "name": box.name,
            "snapshot": box.snapshot,
            "user": box.user,
            "env": box.env,
            "labels": box.labels,
            "public": False,
            "network_block_all": box.network_block_all,
            "kvm": False,
            "target": box.target,
            "cpu": 1,
            "gpu": 0,
            "memory": 1,
            "disk": 10,
            "state": box.state,
            "error_reason": box.error,
            "auto_stop_interval": box.auto_stop,
            "auto_delete_interval": box.auto_delete,
            "auto_archive_interval": 0,
            "created_at": _iso(box.created),
            "updated_at": _iso(box.updated),
            "toolbox_proxy_url": self.url + "/toolbox",
        }

    def _box_json(self, box: _Box) -> dict[str, Any]:
        dto = self.m.Sandbox.from_dict(_camel(self._box_fields(box)))
        assert dto is not None
        out: dict[str, Any] = json.loads(dto.to_json())
        return out

    # -- lookups -----------------------------------------------------------------------------
    def _snap(self, id_or_name: str) -> _SnapRec:
        if id_or_name not in self._snaps and all(r.name != id_or_name for r in self._snaps.values()):
            self._refresh()
        with self._lock:
            rec = self._snaps.get(id_or_name) or next((r for r in self._snaps.values() if r.name == id_or_name), None)
        if rec is None:
            raise _HTTPError(404, f"Snapshot {id_or_name} not found")
        return rec

    def _box(self, id_or_name: str) -> _Box:
        with self._lock:
            box = self._boxes.get(id_or_name) or next((b for b in self._boxes.values() if b.name == id_or_name), None)
        if box is None:
            raise _HTTPError(404, f"Sandbox with ID or name {id_or_name} not found")
        box.activity = time.time()
        return box

    def _running(self, sid: str) -> tuple[_Box, LocalSandbox]:
        box = self._box(sid)
        if box.state != "started" or box.sb is None:
            raise _HTTPError(409, f"Sandbox {sid} is {box.state}; start it first", source=DAEMON)
        return box, box.sb

    # -- snapshots ---------------------------------------------------------------------------
    def _build(self, image: Image, logs: list[str]) -> Snapshot:
        return self.backend.build(image, on_log=logs.append)

    def create_snapshot(self, body: dict[str, Any], query: dict[str, str]) -> tuple[int, Any]:
        req = self.m.CreateSnapshot.from_dict(body)
        assert req is not None
        dockerfile = req.build_info.dockerfile_content if req.build_info else None
        if req.build_info and req.build_info.context_hashes:
            raise _HTTPError(400, "COPY/ADD of local files is not supported by the local Daytona endpoint")
        try:
            image = dockerfile_image(dockerfile) if dockerfile else image_from_ref(req.image_name or "")
        except SandboxError as exc:
            raise _HTTPError(400, str(exc)) from exc
        with self._lock:
            if any(r.name == req.name for r in self._snaps.values()):
                raise _HTTPError(409, f"Snapshot with name {req.name} already exists")
            rec = _SnapRec(id=str(uuid.uuid4()), name=req.name, image_name=req.image_name or req.name)
            self._snaps[rec.id] = rec

        def work() -> None:
            rec.state, rec.updated = "building", time.time()
            try:
                rec.key = self._build(image, rec.logs).key
                rec.state = "active"
                self._save()
            except Exception as exc:  # the client reads it as the snapshot's error reason
                rec.state, rec.error = "build_failed", str(exc)
                rec.logs.append(str(exc))
            rec.updated = time.time()

        threading.Thread(target=work, daemon=True, name=f"build-{rec.name}").start()
        return 200, self._snap_json(rec)

    def no_object_storage(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        raise _HTTPError(400, "COPY/ADD of local files is not supported by the local Daytona endpoint")

    def list_snapshots(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        page, limit = int(query.get("page", 1)), int(query.get("limit", 100))
        self._refresh()
        with self._lock:
            rows = [r for r in self._snaps.values() if query.get("name", "") in r.name]
        rows.sort(key=lambda r: r.created)
        chunk = rows[(page - 1) * limit : page * limit]
        pages = max(1, -(-len(rows) // limit))
        return 200, {
            "items": [self._snap_json(r) for r in chunk],
            "total": len(rows),
            "page": page,
            "totalPages": pages,
        }

    def get_snapshot(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        return 200, self._snap_json(self._snap(sid))

    def delete_snapshot(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        rec = self._snap(sid)
        with self._lock:
            self._snaps.pop(rec.id, None)
            self._deleted.add(rec.id)
        # Snapshots built from images are the engine's build cache, shared with its other users
        # (`pytest-sandbox prune` ages them out); only frozen sandboxes are deleted with their name.
        if rec.key and rec.source_sandbox_id and not any(r.key == rec.key for r in self._snaps.values()):
            with contextlib.suppress(SandboxError):
                self.backend.remove_snapshot(rec.key)
        self._save()
        return 200, None

    def snapshot_logs_url(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        rec = self._snap(sid)
        return 200, {"url": f"{self.api_url}/snapshots/{rec.id}/build-logs"}

    def snapshot_logs(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        rec = self._snap(sid)
        return 200, _LogStream(
            rec.logs, lambda: rec.state not in ("pending", "building"), query.get("follow") == "true"
        )

    # -- sandboxes ---------------------------------------------------------------------------
    def create_sandbox(self, body: dict[str, Any], query: dict[str, str]) -> tuple[int, Any]:
        req = self.m.CreateSandbox.from_dict(body)
        assert req is not None
        target = req.target or self.targets[0]
        if target not in self.targets:
            raise _HTTPError(
                400, f"Region {target!r} is not available here; available targets: {', '.join(self.targets)}"
            )
        box = _Box(
            id=str(uuid.uuid4()),
            name=req.name or "",
            snapshot=req.snapshot,
            labels=dict(req.labels or {}),
            env=dict(req.env or {}),
            user=req.user or "root",
            network_block_all=bool(req.network_block_all),
            target=target,
            auto_stop=15 if req.auto_stop_interval is None else req.auto_stop_interval,
            auto_delete=-1 if req.auto_delete_interval is None else req.auto_delete_interval,
        )
        box.name = box.name or box.id
        with self._lock:
            if any(b.name == box.name for b in self._boxes.values()):
                raise _HTTPError(409, f"Sandbox with name {box.name} already exists")
            self._boxes[box.id] = box
        if req.build_info is not None:
            try:
                image = dockerfile_image(req.build_info.dockerfile_content or "")
            except SandboxError as exc:
                self._boxes.pop(box.id, None)
                raise _HTTPError(400, str(exc)) from exc
            box.state = "pending_build"

            def work() -> None:
                try:
                    snap = self._build(image, box.logs)
                    self._start(box, snap.key)
                except Exception as exc:  # the client reads it as the sandbox's error reason
                    box.state, box.error = "build_failed", str(exc)

            threading.Thread(target=work, daemon=True, name=f"build-{box.id}").start()
            return 200, self._box_json(box)
        if req.snapshot:
            rec = self._snap(req.snapshot)
            if rec.state != "active" or rec.key is None:
                self._boxes.pop(box.id, None)
                raise _HTTPError(400, f"Snapshot {req.snapshot} is {rec.state}; wait until it is active")
            key = rec.key
        else:
            key = self._default_key()
        try:
            self._start(box, key)
        except SandboxError as exc:
            self._boxes.pop(box.id, None)
            raise _HTTPError(500, f"could not start the sandbox: {exc}") from exc
        return 200, self._box_json(box)

    def _default_key(self) -> str:
        return self.backend.build(image_from_ref(self.default_image)).key

    def _start(self, box: _Box, key: str) -> None:
        with box.lock:
            box.sb = self.backend.create(key, network=not box.network_block_all, env=box.env)
            box.state, box.updated, box.activity = "started", time.time(), time.time()

    def list_sandboxes(self, body: Any, query: dict[str, str]) -> tuple[int, Any]:
        want = json.loads(query["labels"]) if query.get("labels") else {}
        with self._lock:
            boxes = [b for b in self._boxes.values() if all(b.labels.get(k) == v for k, v in want.items())]
        items = []
        for b in sorted(boxes, key=lambda b: b.created):
            item = self.m.SandboxListItem.from_dict(_camel(self._box_fields(b)))
            assert item is not None
            items.append(json.loads(item.to_json()))
        return 200, {"items": items, "nextCursor": None}

    def get_sandbox(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        return 200, self._box_json(self._box(sid))

    def delete_sandbox(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        box = self._box(sid)
        self._destroy(box)
        return 200, self._box_json(box)

    def _destroy(self, box: _Box) -> None:
        with box.lock:
            if box.sb is not None:
                box.sb.close()
                box.sb = None
            if box.stopped_key:
                with contextlib.suppress(SandboxError):
                    self.backend.remove_snapshot(box.stopped_key)
                box.stopped_key = None
            box.state, box.updated = "destroyed", time.time()
        with self._lock:
            self._boxes.pop(box.id, None)

    def stop_sandbox(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        box = self._box(sid)
        self._stop_box(box)
        return 200, self._box_json(box)

    def _stop_box(self, box: _Box) -> None:
        # Like Daytona: files survive a stop, processes do not.
        with box.lock:
            if box.sb is None:
                return
            if box.auto_delete == 0:  # ephemeral: deleted as soon as it stops
                self._destroy(box)
                return
            box.stopped_key = box.sb._freeze(description=f"stopped sandbox {box.id}").key
            box.sb.close()
            box.sb, box.state, box.updated = None, "stopped", time.time()

    def start_sandbox(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        box = self._box(sid)
        with box.lock:
            if box.sb is None and box.stopped_key:
                self._start(box, box.stopped_key)
        return 200, self._box_json(box)

    def fork_sandbox(self, body: dict[str, Any], query: dict[str, str], sid: str) -> tuple[int, Any]:
        req = self.m.ForkSandbox.from_dict(body or {})
        box, sb = self._running(sid)
        child = _Box(
            id=str(uuid.uuid4()),
            name=(req.name if req else None) or "",
            snapshot=box.snapshot,
            labels=dict(box.labels),
            env=dict(box.env),
            user=box.user,
            network_block_all=box.network_block_all,
            target=box.target,
            auto_stop=box.auto_stop,
            auto_delete=box.auto_delete,
        )
        child.name = child.name or child.id
        with self._lock:
            if any(b.name == child.name for b in self._boxes.values()):
                raise _HTTPError(409, f"Sandbox with name {child.name} already exists")
            self._boxes[child.id] = child
        with box.lock:
            child.sb = sb.fork()
        child.state = "started"
        return 200, self._box_json(child)

    def snapshot_sandbox(self, body: dict[str, Any], query: dict[str, str], sid: str) -> tuple[int, Any]:
        req = self.m.CreateSandboxSnapshot.from_dict(body)
        assert req is not None
        box, sb = self._running(sid)
        with self._lock:
            if any(r.name == req.name for r in self._snaps.values()):
                raise _HTTPError(409, f"Snapshot with name {req.name} already exists")
            rec = _SnapRec(id=str(uuid.uuid4()), name=req.name, image_name=req.name, source_sandbox_id=box.id)
            self._snaps[rec.id] = rec
        try:
            with box.lock:
                rec.key = sb.snapshot().key
        except SandboxError as exc:
            with self._lock:
                self._snaps.pop(rec.id, None)
            raise _HTTPError(500, f"snapshot failed: {exc}") from exc
        rec.state, rec.updated = "active", time.time()
        self._save()
        return 200, self._box_json(box)

    def replace_labels(self, body: dict[str, Any], query: dict[str, str], sid: str) -> tuple[int, Any]:
        box = self._box(sid)
        box.labels = dict((body or {}).get("labels") or {})
        return 200, {"labels": box.labels}

    def set_interval(self, body: Any, query: dict[str, str], sid: str, what: str, minutes: str) -> tuple[int, Any]:
        box = self._box(sid)
        setattr(box, "auto_stop" if what == "autostop" else "auto_delete", int(minutes))
        return 200, None

    def toolbox_url(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        self._box(sid)
        return 200, {"url": self.url + "/toolbox"}

    def sandbox_logs_url(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        return 200, {"url": f"{self.api_url}/sandbox/{self._box(sid).id}/build-logs"}

    def sandbox_logs(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        box = self._box(sid)
        return 200, _LogStream(box.logs, lambda: box.state != "pending_build", query.get("follow") == "true")

    def _reaper(self) -> None:
        # The safety net Daytona gives idle sandboxes: auto-stop after N idle minutes, and delete
        # N minutes after stopping (0: at once).
        while not self._stop.wait(2.0):
            now = time.time()
            for box in list(self._boxes.values()):
                with contextlib.suppress(Exception):
                    if box.state == "started" and box.auto_stop > 0 and now - box.activity > box.auto_stop * 60:
                        self._stop_box(box)
                    elif box.state == "stopped" and box.auto_delete >= 0 and now - box.updated > box.auto_delete * 60:
                        self._destroy(box)

    # -- toolbox: processes ------------------------------------------------------------------
    def execute(self, body: dict[str, Any], query: dict[str, str], sid: str) -> tuple[int, Any]:
        req = self.t.ExecuteRequest.from_dict(body)
        assert req is not None
        box, sb = self._running(sid)
        if box.shell is None:
            box.shell = next((s for s in _SHELLS if sb.fs.exists(s)), "/bin/sh")
        # As Daytona's daemon: the first of zsh, bash, sh runs the command; output is one stream.
        argv = [box.shell, "-c", "exec 2>&1\n" + req.command]
        try:
            res = sb.exec(argv, cwd=req.cwd or None, env=req.envs or None, timeout=req.timeout or None)
        except ExecTimeoutError as exc:
            raise _HTTPError(
                408, f"command timed out after {req.timeout} seconds", "PROCESS_EXECUTION_TIMEOUT", DAEMON
            ) from exc
        finally:
            box.activity = time.time()
        return 200, json.loads(self.t.ExecuteResponse(exit_code=res.exit_code, result=res.stdout).to_json())

    # -- toolbox: files ----------------------------------------------------------------------
    @staticmethod
    def _file_error(exc: SandboxFileError) -> _HTTPError:
        if exc.errno == errno.ENOENT:
            return _HTTPError(404, str(exc), "FILE_NOT_FOUND", DAEMON)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return _HTTPError(403, str(exc), "FILE_ACCESS_DENIED", DAEMON)
        return _HTTPError(400, str(exc), None, DAEMON)

    def _info(self, sb: LocalSandbox, path: str, name: str, follow: bool = True) -> dict[str, Any]:
        s = sb.fs.stat(path, follow_symlinks=follow)
        # Host ids as the sandbox sees them: rootless, the caller's own id is root inside.
        uid = 0 if s.st_uid == os.getuid() else s.st_uid
        gid = 0 if s.st_gid == os.getgid() else s.st_gid
        info = self.t.FileInfo(
            group="root" if gid == 0 else str(gid),
            is_dir=st.S_ISDIR(s.st_mode),
            mod_time=_iso(s.st_mtime),
            mode=st.filemode(s.st_mode),
            name=name,
            owner="root" if uid == 0 else str(uid),
            permissions=f"{st.S_IMODE(s.st_mode):04o}",
            size=s.st_size,
        )
        out: dict[str, Any] = json.loads(info.to_json())
        return out

    def file_info(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        _, sb = self._running(sid)
        path = query.get("path", "")
        try:
            return 200, self._info(sb, path, path.rstrip("/").rsplit("/", 1)[-1])
        except SandboxFileError as exc:
            raise self._file_error(exc) from exc

    def list_files(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        _, sb = self._running(sid)
        path = query.get("path", "/")
        try:
            return 200, [self._info(sb, f"{path.rstrip('/')}/{n}", n, False) for n in sb.fs.listdir(path)]
        except SandboxFileError as exc:
            raise self._file_error(exc) from exc

    def create_folder(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        _, sb = self._running(sid)
        try:
            sb.fs.mkdir(query.get("path", ""), parents=True, mode=int(query.get("mode") or "755", 8))
        except SandboxFileError as exc:
            raise self._file_error(exc) from exc
        return 200, None

    def delete_file(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        _, sb = self._running(sid)
        try:
            sb.fs.remove(query.get("path", ""), recursive=query.get("recursive") == "true")
        except SandboxFileError as exc:
            raise self._file_error(exc) from exc
        return 204, None

    def _in_sandbox(self, sid: str, argv: list[str]) -> tuple[int, Any]:
        _, sb = self._running(sid)
        res = sb.exec(argv)
        if not res.ok:
            raise _HTTPError(404 if "No such file" in res.stderr else 400, res.stderr.strip(), None, DAEMON)
        return 200, None

    def move_file(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        return self._in_sandbox(sid, ["mv", "--", query.get("source", ""), query.get("destination", "")])

    def set_permissions(self, body: Any, query: dict[str, str], sid: str) -> tuple[int, Any]:
        path = query.get("path", "")
        if query.get("mode"):
            self._in_sandbox(sid, ["chmod", query["mode"], "--", path])
        owner = query.get("owner", "") + (":" + query["group"] if query.get("group") else "")
        if owner:
            self._in_sandbox(sid, ["chown", owner, "--", path])
        return 200, None

    def bulk_upload(self, body: bytes, query: dict[str, str], sid: str, ctype: str = "") -> tuple[int, Any]:
        _, sb = self._running(sid)
        fields = _parse_multipart(body, ctype)
        paths = {k[: -len(".path")]: v.decode() for k, v in fields.items() if k.endswith(".path")}
        for prefix, path in paths.items():
            data = fields.get(prefix + ".file")
            if data is None:
                raise _HTTPError(400, f"no file part for {path}", None, DAEMON)
            try:
                sb.fs.write(path, data)
            except SandboxFileError as exc:
                raise self._file_error(exc) from exc
        return 200, None

    def bulk_download(self, body: dict[str, Any], query: dict[str, str], sid: str) -> tuple[int, Any]:
        _, sb = self._running(sid)
        boundary = uuid.uuid4().hex
        out = bytearray()
        for path in (body or {}).get("paths") or []:
            label = "filename*=utf-8''" + urllib.parse.quote(path, safe="")
            try:
                data, name, ctype = sb.fs.read(path), "file", "application/octet-stream"
            except SandboxFileError as exc:
                data = json.dumps(self._file_error(exc).body()).encode()
                name, ctype = "error", "application/json"
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; {label}\r\n'.encode()
            out += f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        return 200, _Raw(bytes(out), f"multipart/form-data; boundary={boundary}")

    # -- routing -----------------------------------------------------------------------------
    def _route_table(self) -> list[tuple[str, re.Pattern[str], Callable[..., tuple[int, Any]]]]:
        seg = r"([^/]+)"
        rows: list[tuple[str, str, Callable[..., tuple[int, Any]]]] = [
            ("POST", "/api/snapshots", self.create_snapshot),
            ("GET", "/api/object-storage/push-access", self.no_object_storage),
            ("GET", "/api/snapshots", self.list_snapshots),
            ("GET", f"/api/snapshots/{seg}/build-logs-url", self.snapshot_logs_url),
            ("GET", f"/api/snapshots/{seg}/build-logs", self.snapshot_logs),
            ("GET", f"/api/snapshots/{seg}", self.get_snapshot),
            ("DELETE", f"/api/snapshots/{seg}", self.delete_snapshot),
            ("POST", "/api/sandbox", self.create_sandbox),
            ("GET", "/api/sandbox", self.list_sandboxes),
            ("GET", f"/api/sandbox/{seg}/toolbox-proxy-url", self.toolbox_url),
            ("GET", f"/api/sandbox/{seg}/build-logs-url", self.sandbox_logs_url),
            ("GET", f"/api/sandbox/{seg}/build-logs", self.sandbox_logs),
            ("GET", f"/api/sandbox/{seg}", self.get_sandbox),
            ("DELETE", f"/api/sandbox/{seg}", self.delete_sandbox),
            ("POST", f"/api/sandbox/{seg}/start", self.start_sandbox),
            ("POST", f"/api/sandbox/{seg}/stop", self.stop_sandbox),
            ("POST", f"/api/sandbox/{seg}/fork", self.fork_sandbox),
            ("POST", f"/api/sandbox/{seg}/snapshot", self.snapshot_sandbox),
            ("PUT", f"/api/sandbox/{seg}/labels", self.replace_labels),
            ("POST", f"/api/sandbox/{seg}/(autostop|autodelete)/(-?[0-9]+)", self.set_interval),
            ("POST", f"/toolbox/{seg}/process/execute", self.execute),
            ("GET", f"/toolbox/{seg}/files/info", self.file_info),
            ("GET", f"/toolbox/{seg}/files", self.list_files),
            ("POST", f"/toolbox/{seg}/files/folder", self.create_folder),
            ("DELETE", f"/toolbox/{seg}/files", self.delete_file),
            ("POST", f"/toolbox/{seg}/files/move", self.move_file),
            ("POST", f"/toolbox/{seg}/files/permissions", self.set_permissions),
            ("POST", f"/toolbox/{seg}/files/bulk-upload", self.bulk_upload),
            ("POST", f"/toolbox/{seg}/files/bulk-download", self.bulk_download),
        ]
        return [(method, re.compile(pattern + "/?$"), fn) for method, pattern, fn in rows]

    def _rate_ok(self) -> bool:
        if not self._rate:
            return True
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._tokens_at) * self._rate)
            self._tokens_at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, Any]:
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        if not hmac.compare_digest(headers.get("Authorization", "").encode(), f"Bearer {self.api_key}".encode()):
            raise _HTTPError(401, "Unauthorized: set DAYTONA_API_KEY to this endpoint's key")
        if url.path.startswith("/api/") and not self._rate_ok():
            raise _HTTPError(429, "ThrottlerException: Too Many Requests")
        for m, pattern, fn in self._routes:
            match = pattern.match(url.path)
            if m != method or match is None:
                continue
            args = [urllib.parse.unquote(g) for g in match.groups()]
            if fn == self.bulk_upload:
                return fn(body, query, *args, ctype=headers.get("Content-Type", ""))
            try:
                data = json.loads(body) if body else None
            except json.JSONDecodeError as exc:
                raise _HTTPError(400, f"request body is not JSON: {exc}") from exc
            return fn(data, query, *args)
        raise _HTTPError(404, f"Cannot {method} {url.path} (not covered by the local Daytona endpoint)")


def _camel(d: dict[str, Any]) -> dict[str, Any]:
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): v for k, v in d.items()}


@dataclass
class _Raw:
    data: bytes
    ctype: str


@dataclass
class _LogStream:
    lines: list[str]
    done: Callable[[], bool]
    follow: bool


def _parse_multipart(body: bytes, ctype: str) -> dict[str, bytes]:
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not m:
        raise _HTTPError(400, "expected a multipart/form-data body", None, DAEMON)
    out = {}
    for part in (b"\r\n" + body).split(b"\r\n--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part[2:].partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name:
            out[name.group(1).decode()] = data
    return out


class _Handler(BaseHTTPRequestHandler):
    server_app: DaytonaServer
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one segment: with Nagle's algorithm and the client's delayed ACK,
    # a separate body write costs 40 ms per request.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _dispatch(self) -> None:
        try:
            status, result = self.server_app.handle(self.command, self.path, self.headers, self._body())
        except _HTTPError as exc:
            self._send(exc.status, json.dumps(exc.body(self.command, self.path)).encode(), "application/json")
            return
        except Exception as exc:  # a bug here must reach the client as a 500, not a dropped connection
            err = _HTTPError(500, f"{type(exc).__name__}: {exc}")
            self._send(500, json.dumps(err.body(self.command, self.path)).encode(), "application/json")
            return
        if isinstance(result, _Raw):
            self._send(status, result.data, result.ctype)
        elif isinstance(result, _LogStream):
            self._stream(result)
        elif result is None:
            self._send(status, b"", "application/json")
        else:
            self._send(status, json.dumps(result).encode(), "application/json")

    def _stream(self, logs: _LogStream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        while True:
            done = logs.done()
            while sent < len(logs.lines):
                self.wfile.write((logs.lines[sent] + "\n").encode())
                sent += 1
            self.wfile.flush()
            if done or not logs.follow:
                break
            time.sleep(0.2)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch
