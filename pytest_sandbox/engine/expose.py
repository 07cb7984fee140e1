"""Reaching a port on a sandbox's loopback from the host: ``sandbox.expose(port)``.

A sandbox without network has a network namespace of its own with only loopback, which no host
process can connect into. Two parts bridge it:

- :class:`SocketMaker`, a small process that may enter the sandboxes' network namespaces (root
  may; rootless it lives in the sandboxes' user namespace, where it holds that right). Asked
  for a sandbox's init pid, it makes a TCP socket inside that namespace and passes the file
  descriptor back over a Unix socket. A socket keeps the namespace it was made in, so the
  runner connects it itself. The maker exits when the runner does (EOF on its socket).
- :class:`Forwarder`, one asyncio loop thread per backend: a listener on host 127.0.0.1 per
  exposed port, each accepted connection piped to a socket from the maker, with flow control
  (asyncio streams; the standard library's, so no dependency for a few dozen lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Sequence

from .._lifeline import Channel
from ..errors import SandboxError
from ..programs import source

__all__ = ["Exposure", "Forwarder", "SocketMaker"]


class SocketMaker:
    """Makes TCP sockets inside sandboxes' network namespaces (see the module docstring).

    ``launcher`` is the command line it starts through: nothing as root, ``nsenter`` into the
    sandboxes' user namespace rootless.
    """

    def __init__(self, launcher: Sequence[str]) -> None:
        self._channel = Channel(source("socket_maker"), launcher)

    def socket_in(self, pid: int) -> socket.socket:
        """A new, unconnected TCP socket in the network namespace of process ``pid``."""
        try:
            msg, fds = self._channel.call(str(pid).encode(), max_fds=1)
        except OSError as exc:
            raise SandboxError(f"the port forwarder's helper is gone ({exc}); open a new backend") from exc
        if not fds:
            reason = msg.decode(errors="replace") or "its helper exited"
            raise SandboxError(f"cannot reach into the sandbox's network: {reason}")
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        self._channel.close()


class Exposure:
    """One exposed port: ``address`` on host loopback; :meth:`close` stops listening and ends
    its connections."""

    def __init__(self, forwarder: Forwarder, server: asyncio.Server, address: tuple[str, int]) -> None:
        self._forwarder = forwarder
        self._server = server
        self.address = address
        self.writers: set[asyncio.StreamWriter] = set()

    def close(self) -> None:
        self._forwarder.call(self._close)

    async def _close(self) -> None:
        self._server.close()
        for w in list(self.writers):
            w.close()


class Forwarder:
    """One event loop thread, started on first use, for every exposed port of a backend."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, daemon=True, name="sandbox-expose")
                self._thread.start()
                self._loop = loop
            return self._loop

    def call(self, make: Callable[[], object]) -> object:
        """Run coroutine function ``make`` on the loop and wait for its result."""
        loop = self._ensure()
        coro = make()
        assert asyncio.iscoroutine(coro)
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    def open(self, port: int, connect: Callable[[], socket.socket]) -> Exposure:
        """Listen on a free port of host 127.0.0.1; each connection goes to ``port`` through a
        socket from ``connect()`` (made in the sandbox's network namespace)."""
        listener = socket.create_server(("127.0.0.1", 0))
        return self._serve(listener, connect, ("127.0.0.1", port))

    def open_inward(self, maker: SocketMaker, pid: int, port: int, target: tuple[str, int]) -> Exposure:
        """``127.0.0.1:port`` in the network namespace of process ``pid`` leads to ``target`` in
        this process's network (the host's): one host port, and nothing else of the host's
        loopback, for a sandbox that needs it (a build step's proxy on the host's loopback)."""
        listener = maker.socket_in(pid)
        try:
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise SandboxError(f"cannot forward {target[0]}:{target[1]} into the sandbox's network: {exc}") from exc
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        return self._serve(listener, lambda: socket.socket(family, socket.SOCK_STREAM), target)

    def _serve(
        self, listener: socket.socket, new_socket: Callable[[], socket.socket], target: tuple[str, int]
    ) -> Exposure:
        """Serve ``listener``: each accepted connection piped to ``target`` over ``new_socket()``."""
        listener.setblocking(False)
        holder: list[Exposure] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            exp = holder[0]
            exp.writers.add(writer)
            inner_w: asyncio.StreamWriter | None = None
            try:
                inner = new_socket()
                inner.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(inner, target)
                except OSError:
                    inner.close()
                    return  # nothing listens there: the client sees its connection closed
                inner_r, inner_w = await asyncio.open_connection(sock=inner)
                exp.writers.add(inner_w)
                await asyncio.gather(_pipe(reader, inner_w), _pipe(inner_r, writer))
            except (OSError, SandboxError):
                pass
            finally:
                for w in (writer, inner_w):
                    if w is not None:
                        exp.writers.discard(w)
                        w.close()

        async def serve() -> Exposure:
            server = await asyncio.start_server(handle, sock=listener)
            exp = Exposure(self, server, listener.getsockname()[:2])
            holder.append(exp)
            return exp

        result = self.call(serve)
        assert isinstance(result, Exposure)
        return result

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on (a client may wait for the server's end)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
