"""The endpoint's HTTP side on ``aiohttp.web``: routes, the bearer key, the rate limit, reading
request bodies (JSON and multipart), and the answers, streamed ones included.

Handlers never block the event loop: whatever reaches the backend runs in the ``work`` thread
pool, and record lookups in the small ``meta`` pool, so long commands filling the first never
keep a client from reading a sandbox's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import BodyPartReader, MultipartWriter, hdrs, web
from aiohttp.web_urldispatcher import MatchInfoError

from ..errors import SandboxError
from . import models
from .models import Body, Query
from .records import DAEMON, ApiError, SandboxRecord, SandboxSpec
from .state import EndpointState
from .toolbox import Toolbox

__all__ = ["Api"]

T = TypeVar("T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ok(data: Any = None, status: int = 200) -> web.Response:
    if data is None:  # as Daytona: an empty JSON answer
        return web.Response(status=status, content_type="application/json")
    return web.json_response(data, status=status)


class Api:
    """The routes of the Daytona API (``/api``) and toolbox (``/toolbox/{id}``) over ``state``;
    :meth:`app` is the aiohttp application. ``url`` is where clients reach it."""

    def __init__(
        self,
        state: EndpointState,
        *,
        url: str,
        api_key: str,
        work: ThreadPoolExecutor,
        meta: ThreadPoolExecutor,
        rate_limit: float | None = None,
        max_body: int = 64 << 20,
        request_timeout: float = 60.0,
    ) -> None:
        self.state, self.toolbox = state, Toolbox(state)
        self.url, self.api_url, self.toolbox_url = url, url + "/api", url + "/toolbox"
        self._bearer = f"Bearer {api_key}".encode()
        self._work, self._meta = work, meta
        self.max_body, self.request_timeout = max_body, request_timeout
        self._rate = rate_limit
        self._tokens = rate_limit or 0.0
        self._tokens_at = time.monotonic()

    def app(self) -> web.Application:
        """The aiohttp application: every route, the middleware, and the reaper's task."""
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body)
        app.cleanup_ctx.append(self._reaper)
        api, snap, box, tb = "/api", "/api/snapshots/{sid}", "/api/sandbox/{sid}", "/toolbox/{sid}"
        rows: list[tuple[str, str, _Handler]] = [
            ("POST", f"{api}/snapshots", self.create_snapshot),
            ("GET", f"{api}/object-storage/push-access", self.no_object_storage),
            ("GET", f"{api}/snapshots", self.list_snapshots),
            ("GET", f"{snap}/build-logs-url", self.snapshot_logs_url),
            ("GET", f"{snap}/build-logs", self.snapshot_logs),
            ("GET", snap, self.get_snapshot),
            ("DELETE", snap, self.delete_snapshot),
            ("POST", f"{api}/sandbox", self.create_sandbox),
            ("GET", f"{api}/sandbox", self.list_sandboxes),
            ("GET", f"{box}/toolbox-proxy-url", self.get_toolbox_url),
            ("GET", box + "/ports/{port:[0-9]+}/preview-url", self.get_preview_url),
            ("GET", f"{box}/build-logs-url", self.sandbox_logs_url),
            ("GET", f"{box}/build-logs", self.sandbox_logs),
            ("GET", box, self.get_sandbox),
            ("DELETE", box, self.delete_sandbox),
            ("POST", f"{box}/start", self.start_sandbox),
            ("POST", f"{box}/stop", self.stop_sandbox),
            ("POST", f"{box}/fork", self.fork_sandbox),
            ("POST", f"{box}/snapshot", self.snapshot_sandbox),
            ("PUT", f"{box}/labels", self.replace_labels),
            ("POST", box + "/{what:autostop|autodelete}/{minutes:-?[0-9]+}", self.set_interval),
            ("POST", f"{tb}/process/execute", self.execute),
            ("GET", f"{tb}/files/info", self.file_info),
            ("GET", f"{tb}/files", self.list_files),
            ("POST", f"{tb}/files/folder", self.create_folder),
            ("DELETE", f"{tb}/files", self.delete_file),
            ("POST", f"{tb}/files/move", self.move_file),
            ("POST", f"{tb}/files/permissions", self.set_permissions),
            ("POST", f"{tb}/files/bulk-upload", self.bulk_upload),
            ("POST", f"{tb}/files/bulk-download", self.bulk_download),
        ]
        for method, path, handler in rows:
            # A trailing slash is the same route, as it was for the hand-written router before.
            app.router.add_route(method, path, handler)
            app.router.add_route(method, path + "/", handler)
        return app

    # -- plumbing ----------------------------------------------------------------------------
    async def _reaper(self, app: web.Application) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(2.0)
                await self._call(self._work, self.state.reap)

        task = asyncio.create_task(sweep())
        yield
        task.cancel()
        # Cancelled, or the sweep's own failure: either way the app is ending.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _call(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    def _rate_ok(self) -> bool:
        # A token bucket; only the event loop's thread touches it, so it needs no lock.
        if not self._rate:
            return True
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    @staticmethod
    async def _error(request: web.Request, exc: ApiError) -> web.Response:
        resp = web.json_response(models.error_body(exc, request.method, request.path_qs), status=exc.status)
        if exc.status == 408:
            # A body that stalled is not worth waiting for, yet aiohttp would linger for it (as
            # it does, usefully, for a too large one, so that the sender reads the 413): answer,
            # then hang up (closing the transport still sends what is buffered).
            await resp.prepare(request)
            await resp.write_eof()
            if request.protocol is not None:
                request.protocol.force_close()
        return resp

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            if not hmac.compare_digest(request.headers.get(hdrs.AUTHORIZATION, "").encode(), self._bearer):
                raise ApiError(401, "Unauthorized: set DAYTONA_API_KEY to this endpoint's key")
            if request.path.startswith("/api/") and not self._rate_ok():
                raise ApiError(429, "ThrottlerException: Too Many Requests")
            if isinstance(request.match_info, MatchInfoError):  # no such route (404) or method (405)
                raise ApiError(
                    404, f"Cannot {request.method} {request.path} (not covered by the local Daytona endpoint)"
                )
            if (request.content_length or 0) > self.max_body:
                raise self._too_large()
            return await handler(request)
        except ApiError as exc:
            return await self._error(request, exc)
        except web.HTTPException as exc:  # aiohttp's own refusals
            return await self._error(request, ApiError(exc.status, exc.text or exc.reason))
        except Exception as exc:  # a bug here must reach the client as a 500, not a dropped connection
            return await self._error(request, ApiError(500, f"{type(exc).__name__}: {exc}"))

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this endpoint's limit of {self.max_body} bytes")

    def _too_slow(self) -> ApiError:
        return ApiError(408, f"the request body did not arrive within {self.request_timeout:g} s")

    async def _body(self, request: web.Request) -> Body:
        """The request's JSON object (an empty body is ``{}``), within ``request_timeout``."""
        try:
            raw = await asyncio.wait_for(request.read(), self.request_timeout)
        except asyncio.TimeoutError:
            raise self._too_slow() from None
        except web.HTTPRequestEntityTooLarge:  # chunked bodies: no Content-Length to check first
            raise self._too_large() from None
        if not raw.strip():
            return Body({})
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from exc
        return Body(data)

    async def _form(self, request: web.Request) -> dict[str, bytes]:
        """The fields of a multipart/form-data body, at most ``max_body`` bytes in all."""
        try:
            reader = await request.multipart()
        except (ValueError, KeyError, AssertionError) as exc:  # no multipart type or boundary
            raise ApiError(400, f"expected a multipart/form-data body ({exc})", None, DAEMON) from exc
        fields: dict[str, bytes] = {}
        total = 0
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "nested multipart bodies are not supported", None, DAEMON)
                data = bytearray()
                while chunk := await part.read_chunk():
                    total += len(chunk)
                    if total > self.max_body:
                        raise self._too_large()
                    data += chunk
                fields[part.name or ""] = bytes(data)
        except ValueError as exc:  # aiohttp's word for a malformed multipart body
            raise ApiError(400, f"malformed multipart body: {exc}", None, DAEMON) from exc
        return fields

    def _box_json(self, box: SandboxRecord) -> dict[str, Any]:
        return models.sandbox_json(box, self.toolbox_url)

    async def _stream_logs(
        self, request: web.Request, lines: list[str], done: Callable[[], bool]
    ) -> web.StreamResponse:
        # The lines so far, then (follow=true) new ones as they come until the build ends.
        follow = Query(request.query).flag("follow")
        resp = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/plain; charset=utf-8"})
        resp.force_close()  # the end of the stream is the end of the connection, as before
        await resp.prepare(request)
        sent = 0
        try:
            while True:
                finished = done()
                if sent < len(lines):
                    new = lines[sent:]
                    sent += len(new)
                    await resp.write("".join(line + "\n" for line in new).encode())
                if finished or not follow:
                    break
                await asyncio.sleep(0.2)
            await resp.write_eof()
        except ConnectionError:  # the client stopped reading: nothing left to tell it
            pass
        return resp

    # -- snapshots ---------------------------------------------------------------------------
    async def create_snapshot(self, request: web.Request) -> web.Response:
        """POST /api/snapshots: start building a snapshot (an image name or a Dockerfile)."""
        body = await self._body(request)
        name, image_name, info = body.text("name"), body.opt_text("imageName"), body.opt_obj("buildInfo")
        dockerfile = info.text("dockerfileContent") if info else None
        context = bool(info.text_list("contextHashes")) if info else False
        sizes = {k: body.opt_int(k) for k in ("cpu", "memory", "disk")}
        rec = await self._call(
            self._meta, lambda: self.state.create_snapshot(name, image_name, dockerfile, context, sizes)
        )
        return _ok(models.snapshot_json(rec))

    async def no_object_storage(self, request: web.Request) -> web.Response:
        """GET /api/object-storage/push-access: there is no object storage for build contexts."""
        raise ApiError(400, "COPY/ADD of local files is not supported by the local Daytona endpoint")

    async def list_snapshots(self, request: web.Request) -> web.Response:
        """GET /api/snapshots?page=&limit=&name=: one page of snapshots, oldest first."""
        q = Query(request.query)
        page, limit, name = q.integer("page", 1, 1), q.integer("limit", 100, 1), q.text("name")
        rows = await self._call(self._meta, lambda: self.state.snapshots(name))
        chunk = rows[(page - 1) * limit : page * limit]
        pages = max(1, -(-len(rows) // limit))
        items = [models.snapshot_json(r) for r in chunk]
        return _ok({"items": items, "total": len(rows), "page": page, "totalPages": pages})

    async def get_snapshot(self, request: web.Request) -> web.Response:
        """GET /api/snapshots/{id or name}."""
        sid = request.match_info["sid"]
        return _ok(models.snapshot_json(await self._call(self._meta, lambda: self.state.snapshot(sid))))

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        """DELETE /api/snapshots/{id or name}."""
        sid = request.match_info["sid"]
        await self._call(self._work, lambda: self.state.delete_snapshot(sid))
        return _ok()

    async def snapshot_logs_url(self, request: web.Request) -> web.Response:
        """GET /api/snapshots/{id}/build-logs-url: where its build logs stream from."""
        sid = request.match_info["sid"]
        rec = await self._call(self._meta, lambda: self.state.snapshot(sid))
        return _ok({"url": f"{self.api_url}/snapshots/{rec.id}/build-logs"})

    async def snapshot_logs(self, request: web.Request) -> web.StreamResponse:
        """GET /api/snapshots/{id}/build-logs[?follow=true]."""
        sid = request.match_info["sid"]
        rec = await self._call(self._meta, lambda: self.state.snapshot(sid))
        return await self._stream_logs(request, rec.logs, lambda: rec.state not in ("pending", "building"))

    # -- sandboxes ---------------------------------------------------------------------------
    async def create_sandbox(self, request: web.Request) -> web.Response:
        """POST /api/sandbox: a sandbox from a snapshot, a Dockerfile, or the default image."""
        body = await self._body(request)
        info = body.opt_obj("buildInfo")
        spec = SandboxSpec(
            name=body.opt_text("name"),
            snapshot=body.opt_text("snapshot"),
            labels=body.text_map("labels"),
            env=body.text_map("env"),
            user=body.opt_text("user"),
            network_block_all=body.flag("networkBlockAll"),
            network_allow_list=body.opt_text("networkAllowList"),
            domain_allow_list=body.opt_text("domainAllowList"),
            target=body.opt_text("target"),
            auto_stop=body.opt_int("autoStopInterval"),
            auto_delete=body.opt_int("autoDeleteInterval"),
            dockerfile=info.text("dockerfileContent") if info else None,
            cpu=body.opt_int("cpu"),
            memory=body.opt_int("memory"),
            disk=body.opt_int("disk"),
        )
        return _ok(self._box_json(await self._call(self._work, lambda: self.state.create_sandbox(spec))))

    async def list_sandboxes(self, request: web.Request) -> web.Response:
        """GET /api/sandbox[?labels={json}]: the sandboxes carrying all those labels."""
        labels = Query(request.query).labels()
        boxes = await self._call(self._meta, lambda: self.state.sandboxes(labels))
        return _ok({"items": [models.sandbox_item_json(b, self.toolbox_url) for b in boxes], "nextCursor": None})

    async def _on_box(
        self, request: web.Request, op: Callable[[str], SandboxRecord], pool: ThreadPoolExecutor
    ) -> web.Response:
        sid = request.match_info["sid"]
        return _ok(self._box_json(await self._call(pool, lambda: op(sid))))

    async def get_sandbox(self, request: web.Request) -> web.Response:
        """GET /api/sandbox/{id or name}."""
        return await self._on_box(request, self.state.sandbox, self._meta)

    async def delete_sandbox(self, request: web.Request) -> web.Response:
        """DELETE /api/sandbox/{id}: its last record, state ``destroyed``."""
        return await self._on_box(request, self.state.delete_sandbox, self._work)

    async def start_sandbox(self, request: web.Request) -> web.Response:
        """POST /api/sandbox/{id}/start."""
        return await self._on_box(request, self.state.start_sandbox, self._work)

    async def stop_sandbox(self, request: web.Request) -> web.Response:
        """POST /api/sandbox/{id}/stop."""
        return await self._on_box(request, self.state.stop_sandbox, self._work)

    async def fork_sandbox(self, request: web.Request) -> web.Response:
        """POST /api/sandbox/{id}/fork: the new sandbox."""
        name = (await self._body(request)).opt_text("name")
        return await self._on_box(request, lambda sid: self.state.fork_sandbox(sid, name), self._work)

    async def snapshot_sandbox(self, request: web.Request) -> web.Response:
        """POST /api/sandbox/{id}/snapshot: record its files as a named snapshot."""
        name = (await self._body(request)).text("name")
        return await self._on_box(request, lambda sid: self.state.snapshot_sandbox(sid, name), self._work)

    async def replace_labels(self, request: web.Request) -> web.Response:
        """PUT /api/sandbox/{id}/labels."""
        labels = (await self._body(request)).text_map("labels")
        sid = request.match_info["sid"]
        return _ok({"labels": await self._call(self._meta, lambda: self.state.set_labels(sid, labels))})

    async def set_interval(self, request: web.Request) -> web.Response:
        """POST /api/sandbox/{id}/autostop|autodelete/{minutes}."""
        sid, what = request.match_info["sid"], request.match_info["what"]
        minutes = int(request.match_info["minutes"])  # the route's pattern made sure it is one
        await self._call(self._meta, lambda: self.state.set_interval(sid, what, minutes))
        return _ok()

    async def get_toolbox_url(self, request: web.Request) -> web.Response:
        """GET /api/sandbox/{id}/toolbox-proxy-url."""
        sid = request.match_info["sid"]
        await self._call(self._meta, lambda: self.state.sandbox(sid))
        return _ok({"url": self.toolbox_url})

    async def get_preview_url(self, request: web.Request) -> web.Response:
        """GET /api/sandbox/{id}/ports/{port}/preview-url: the sandbox's port on this machine's
        loopback (the backend's expose()), where Daytona gives a proxied HTTPS link; no token."""
        sid, port = request.match_info["sid"], int(request.match_info["port"])
        if not 0 < port < 65536:
            raise ApiError(400, f"port must be 1-65535, got {port}")

        def link() -> dict[str, str]:
            box, sb = self.state.running(sid)
            try:
                host, local = sb.expose(port, protocol="http")
            except SandboxError as exc:
                raise ApiError(400, f"cannot preview port {port}: {exc}") from exc
            return {"sandboxId": box.id, "url": f"http://{host}:{local}", "token": ""}

        return _ok(await self._call(self._work, link))

    async def sandbox_logs_url(self, request: web.Request) -> web.Response:
        """GET /api/sandbox/{id}/build-logs-url."""
        sid = request.match_info["sid"]
        box = await self._call(self._meta, lambda: self.state.sandbox(sid))
        return _ok({"url": f"{self.api_url}/sandbox/{box.id}/build-logs"})

    async def sandbox_logs(self, request: web.Request) -> web.StreamResponse:
        """GET /api/sandbox/{id}/build-logs[?follow=true]: the logs of its image's build."""
        sid = request.match_info["sid"]
        box = await self._call(self._meta, lambda: self.state.sandbox(sid))
        return await self._stream_logs(request, box.logs, lambda: box.state != "pending_build")

    # -- toolbox -----------------------------------------------------------------------------
    async def execute(self, request: web.Request) -> web.Response:
        """POST /toolbox/{id}/process/execute: run a command; stdout and stderr as one stream."""
        body = await self._body(request)
        command, cwd, envs = body.text("command"), body.opt_text("cwd"), body.text_map("envs")
        timeout = body.opt_int("timeout")
        if timeout is not None and timeout < 0:
            raise ApiError(400, f"timeout must be at least 0 seconds, not {timeout}")
        sid = request.match_info["sid"]
        res = await self._call(self._work, lambda: self.toolbox.execute(sid, command, cwd, envs, timeout or None))
        return _ok(models.execute_json(res.exit_code, res.stdout))

    async def file_info(self, request: web.Request) -> web.Response:
        """GET /toolbox/{id}/files/info?path=."""
        sid, path = request.match_info["sid"], Query(request.query).text("path")
        return _ok(models.file_info_json(await self._call(self._work, lambda: self.toolbox.file_info(sid, path))))

    async def list_files(self, request: web.Request) -> web.Response:
        """GET /toolbox/{id}/files?path=."""
        sid, path = request.match_info["sid"], Query(request.query).text("path", "/")
        infos = await self._call(self._work, lambda: self.toolbox.list_files(sid, path))
        return _ok([models.file_info_json(i) for i in infos])

    async def create_folder(self, request: web.Request) -> web.Response:
        """POST /toolbox/{id}/files/folder?path=&mode=."""
        q = Query(request.query)
        sid, path, mode = request.match_info["sid"], q.text("path"), q.mode("755")
        await self._call(self._work, lambda: self.toolbox.create_folder(sid, path, mode))
        return _ok()

    async def delete_file(self, request: web.Request) -> web.Response:
        """DELETE /toolbox/{id}/files?path=&recursive=."""
        q = Query(request.query)
        sid, path, recursive = request.match_info["sid"], q.text("path"), q.flag("recursive")
        await self._call(self._work, lambda: self.toolbox.delete_file(sid, path, recursive))
        return _ok(status=204)

    async def move_file(self, request: web.Request) -> web.Response:
        """POST /toolbox/{id}/files/move?source=&destination=."""
        q = Query(request.query)
        sid, src, dst = request.match_info["sid"], q.text("source"), q.text("destination")
        await self._call(self._work, lambda: self.toolbox.move_file(sid, src, dst))
        return _ok()

    async def set_permissions(self, request: web.Request) -> web.Response:
        """POST /toolbox/{id}/files/permissions?path=&mode=&owner=&group=."""
        q, sid = Query(request.query), request.match_info["sid"]
        path, mode, owner, group = q.text("path"), q.text("mode"), q.text("owner"), q.text("group")
        await self._call(self._work, lambda: self.toolbox.set_permissions(sid, path, mode, owner, group))
        return _ok()

    async def bulk_upload(self, request: web.Request) -> web.Response:
        """POST /toolbox/{id}/files/bulk-upload: form fields ``files[i].path`` and ``files[i].file``."""
        try:
            fields = await asyncio.wait_for(self._form(request), self.request_timeout)
        except asyncio.TimeoutError:
            raise self._too_slow() from None
        files = []
        for key, value in fields.items():
            if key.endswith(".path"):
                path, data = value.decode(errors="replace"), fields.get(key[: -len(".path")] + ".file")
                if data is None:
                    raise ApiError(400, f"no file part for {path}", None, DAEMON)
                files.append((path, data))
        sid = request.match_info["sid"]
        await self._call(self._work, lambda: self.toolbox.write_files(sid, files))
        return _ok()

    async def bulk_download(self, request: web.Request) -> web.Response:
        """POST /toolbox/{id}/files/bulk-download: a multipart answer, one part per path, named
        ``file`` (its content) or ``error`` (the daemon's error for it)."""
        paths = (await self._body(request)).text_list("paths")
        sid = request.match_info["sid"]
        results = await self._call(self._work, lambda: self.toolbox.read_files(sid, paths))
        writer = MultipartWriter("form-data")
        for path, result in zip(paths, results, strict=True):
            # filename* carries the path byte for byte: the SDK matches parts to paths by it.
            label = "filename*=utf-8''" + urllib.parse.quote(path, safe="")
            if isinstance(result, ApiError):
                data, name, ctype = json.dumps(models.error_body(result)).encode(), "error", "application/json"
            else:
                data, name, ctype = result, "file", "application/octet-stream"
            disposition = f'form-data; name="{name}"; {label}'
            writer.append(data, {hdrs.CONTENT_TYPE: ctype, hdrs.CONTENT_DISPOSITION: disposition})
        return web.Response(body=writer)
