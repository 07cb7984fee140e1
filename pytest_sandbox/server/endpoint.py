""":class:`DaytonaServer`: the endpoint as the CLI runs it, a blocking ``serve_forever()`` on an
event loop of its own in the calling thread, and a ``shutdown()`` callable from anywhere."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from ..store import default_cache_dir
from ..types import Backend
from .app import Api
from .state import EndpointState

__all__ = ["DaytonaServer"]


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    # Bound here rather than when serving starts: the real port is known, and a busy one is
    # reported, as soon as the server is constructed. One address, as a URL names one.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


class DaytonaServer:
    """The Daytona-compatible endpoint over ``backend``, listening from construction on.
    ``serve_forever()`` answers until ``shutdown()``, which deletes every sandbox it created
    (snapshots stay, recorded in ``state_dir``; default: the cache directory's ``daytona-endpoint``).

    ``api_key``: the bearer token every request must carry (a random one when not given): sandboxes
    with a network reach this port on loopback, and must not drive other sandboxes through it.
    ``rate_limit``: requests per second the REST API allows before answering 429, to exercise
    clients' back-off as Daytona's limits would. ``max_body``: the largest request body in bytes
    (413 beyond); ``request_timeout``: seconds a client has to send it (408 after);
    ``keepalive_timeout``: seconds a connection may sit idle, or with a request half sent.
    ``workers``: backend calls run at once (the rest wait their turn); ``backlog``: connections
    the kernel queues before the endpoint takes them.
    """

    def __init__(
        self,
        backend: Backend,
        state_dir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        targets: tuple[str, ...] = ("local",),
        rate_limit: float | None = None,
        default_image: str = "host",
        max_body: int = 64 << 20,
        request_timeout: float = 60.0,
        keepalive_timeout: float = 15.0,
        workers: int = 128,
        backlog: int = 1024,
    ) -> None:
        self.backend = backend
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.state = EndpointState(
            backend,
            state_dir if state_dir is not None else default_cache_dir() / "daytona-endpoint",
            targets=targets,
            default_image=default_image,
        )
        sock = _listen(host, port, backlog)
        self.host, self.port = host, int(sock.getsockname()[1])
        self._work = ThreadPoolExecutor(workers, thread_name_prefix="daytona-work")
        # Lookups get threads of their own: a full work pool must not stall `get sandbox`.
        self._meta = ThreadPoolExecutor(4, thread_name_prefix="daytona-meta")
        api = Api(
            self.state,
            url=self.url,
            api_key=self.api_key,
            work=self._work,
            meta=self._meta,
            rate_limit=rate_limit,
            max_body=max_body,
            request_timeout=request_timeout,
        )
        self._guard = threading.RLock()  # reentrant: shutdown() may run in a signal handler
        self._serving: int | None = None  # the thread in serve_forever()
        self._closer: int | None = None  # the thread that runs _close()
        self._stopping = self._interrupted = False
        self._closed = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(
            api.app(), access_log=None, keepalive_timeout=keepalive_timeout, shutdown_timeout=5.0
        )
        try:
            self._loop.run_until_complete(self._runner.setup())
            # Listening from here on: connections wait in the backlog until serve_forever().
            self._loop.run_until_complete(web.SockSite(self._runner, sock, backlog=backlog).start())
        except BaseException:
            sock.close()
            self._close()
            raise

    @property
    def url(self) -> str:
        """The endpoint's root URL (the toolbox lives under ``/toolbox``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        """What clients set as DAYTONA_API_URL."""
        return self.url + "/api"

    def serve_forever(self) -> None:
        """Answer requests in this thread until :meth:`shutdown`. In the main thread, Ctrl-C
        (SIGINT) ends it with KeyboardInterrupt; then call :meth:`shutdown` to clean up."""
        with self._guard:
            if self._stopping:
                return
            self._serving = threading.get_ident()
        # Ctrl-C must not raise KeyboardInterrupt inside a request's task: the task keeps it and
        # raises it again while the loop runs its cleanup. Taken as a loop callback, it only
        # stops the loop, and the KeyboardInterrupt is raised out here.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT)
        if main:
            self._loop.add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            self._loop.run_forever()
        finally:
            if main:
                self._loop.remove_signal_handler(signal.SIGINT)
                signal.signal(signal.SIGINT, previous)
            with self._guard:
                self._serving = None
                stopping, interrupted = self._stopping, self._interrupted
            if stopping:
                self._close()
        if interrupted and not stopping:
            raise KeyboardInterrupt

    def _interrupt(self) -> None:
        self._interrupted = True
        self._loop.stop()

    def shutdown(self) -> None:
        """Stop answering and delete every sandbox (snapshots stay). Idempotent; callable from
        any thread, or from a signal handler. From another thread than the serving one, it
        returns once the sandboxes are gone."""
        me = threading.get_ident()
        with self._guard:
            self._stopping = True
            serving, closer = self._serving, self._closer
        if serving is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        elif closer is None:
            self._close()
        # In the serving or the closing thread (a signal handler), that thread finishes the job.
        if me not in (serving, closer):
            self._closed.wait()

    def _close(self) -> None:
        with self._guard:
            if self._closer is not None:  # under way already (or done)
                return
            self._closer = threading.get_ident()
        try:
            self._loop.run_until_complete(self._runner.cleanup())
        finally:
            # Queued requests are dropped; running ones finish against deleted sandboxes.
            self._work.shutdown(wait=False, cancel_futures=True)
            self._meta.shutdown(wait=False, cancel_futures=True)
            self.state.close()
            self._loop.close()
            self._closed.set()
