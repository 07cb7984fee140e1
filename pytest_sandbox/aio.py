"""The async API: the same backends, sandboxes and files, awaited from one event loop.

::

    from pytest_sandbox import Image, aio

    async with aio.open_backend("local") as backend:
        snap = await backend.build(Image.debian().apt_install("git"))
        async with await backend.create(snap) as sb:
            results = await asyncio.gather(*(sb.exec(f"echo {i}") for i in range(10)))
            child = await sb.fork()

Every blocking call runs on the backend's own thread pool (``max_threads``, 64 by default), so
the loop never waits and many sandboxes work at once; on Daytona an exec is an ``AsyncDaytona``
request instead, with no thread. Cancelling a task that awaits ``exec`` kills the command's whole
process tree before the ``CancelledError`` reaches the task; the sandbox stays usable. Other calls
(a build, a fork) cannot be stopped half-way: cancelled, they finish in the background and what
they made is closed with the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ._offload import offload
from .backends import open_backend as _open_sync
from .backends._base import exec_argv, exec_cwd, exec_env
from .image import Image
from .types import (
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_READ,
    Backend,
    ExecResult,
    FileInfo,
    Limits,
    LimitStatus,
    LogCallback,
    Network,
    Sandbox,
    ServiceStatus,
    Snapshot,
    Usage,
)

__all__ = ["AsyncBackend", "AsyncFS", "AsyncSandbox", "open_backend"]

T = TypeVar("T")

DEFAULT_THREADS = 64
"""Blocking calls an :class:`AsyncBackend` runs at once; more wait for a free thread."""


_Self = TypeVar("_Self", bound="_Awaited")


class _Awaited:
    """What the async wrappers share: the sync object each drives, calls to it on the backend's
    thread pool, and ``async with``, which closes it."""

    sync: object
    _pool: Executor

    async def _call(self, fn: Callable[[], T]) -> T:
        return await offload(self._pool, fn)

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sync!r}>"


class AsyncFS:
    """A sandbox's files, awaited: the operations of :class:`~pytest_sandbox.SandboxFS`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def read(self, path: str, max_size: int = DEFAULT_MAX_READ) -> bytes:
        """The file's bytes (at most ``max_size``)."""
        return await self._sb._call(lambda: self._sb.sync.fs.read(path, max_size))

    async def read_text(self, path: str, max_size: int = DEFAULT_MAX_READ) -> str:
        """The file as UTF-8 text."""
        return await self._sb._call(lambda: self._sb.sync.fs.read_text(path, max_size))

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file, its parent directories made as needed."""
        await self._sb._call(lambda: self._sb.sync.fs.write(path, data, mode))

    async def upload(self, local: str | Path, path: str) -> None:
        """Copy a host file or directory into the sandbox."""
        await self._sb._call(lambda: self._sb.sync.fs.upload(local, path))

    async def download(self, path: str, local: str | Path, max_size: int = DEFAULT_MAX_DOWNLOAD) -> None:
        """Copy a sandbox file or directory to the host."""
        await self._sb._call(lambda: self._sb.sync.fs.download(path, local, max_size))

    async def listdir(self, path: str) -> list[str]:
        """The names in a directory, sorted."""
        return await self._sb._call(lambda: self._sb.sync.fs.listdir(path))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        return await self._sb._call(lambda: self._sb.sync.fs.exists(path))

    async def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory."""
        return await self._sb._call(lambda: self._sb.sync.fs.is_dir(path))

    async def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        """Make a directory."""
        await self._sb._call(lambda: self._sb.sync.fs.mkdir(path, parents, mode))

    async def stat(self, path: str, follow_symlinks: bool = True) -> FileInfo:
        """Mode, size, mtime and owner of ``path``."""
        return await self._sb._call(lambda: self._sb.sync.fs.stat(path, follow_symlinks))

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory (``recursive=True`` for a non-empty one)."""
        await self._sb._call(lambda: self._sb.sync.fs.remove(path, recursive))


class AsyncSandbox(_Awaited):
    """A sandbox, awaited. ``async with`` closes it; ``sync`` is the sandbox it drives."""

    def __init__(self, sandbox: Sandbox, backend: AsyncBackend) -> None:
        self.sync: Sandbox = sandbox
        self._backend = backend
        self._pool = backend._pool
        self.fs = AsyncFS(self)
        backend._live.add(self)

    @property
    def id(self) -> str:
        """The sandbox's id on its backend."""
        return self.sync.id

    @property
    def snapshot_of(self) -> Snapshot:
        """The snapshot it was forked from."""
        return self.sync.snapshot_of

    @property
    def history(self) -> list[ExecResult]:
        """Every command it ran, in order (each output's tail)."""
        return self.sync.history

    async def exec(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command and wait for it, as :meth:`Sandbox.exec <pytest_sandbox.Sandbox.exec>`
        does. Cancelling the awaiting task kills every process the command started, then raises
        ``CancelledError``; processes it left in the background earlier keep running."""
        argv = exec_argv(command)
        kw: dict[str, Any] = {
            "cwd": exec_cwd(cwd),
            "env": exec_env(env),
            "input": input,
            "timeout": timeout,
            "max_output": max_output,
        }
        arun = getattr(self.sync, "_arun", None)
        if arun is None:  # a sandbox of another implementation: a thread, not stoppable
            return await self._call(lambda: self.sync.exec(argv, **kw))
        result: ExecResult = await arun(argv, executor=self._backend._pool, **kw)
        return result

    async def limits(self) -> dict[str, LimitStatus]:
        """Each limit of this sandbox and how it is held."""
        return await self._call(lambda: self.sync.limits)

    async def services(self) -> dict[str, ServiceStatus]:
        """Each service of its snapshot: ready, not ready or stopped, and its log."""
        return await self._call(lambda: self.sync.services)

    async def expose(self, port: int, protocol: str = "tcp") -> tuple[str, int]:
        """A ``(host, port)`` that reaches ``port`` in the sandbox (see ``Sandbox.expose``)."""
        return await self._call(lambda: self.sync.expose(port, protocol))

    async def snapshot(self, name: str | None = None, *, live: bool = False) -> Snapshot:
        """Freeze its current state into a snapshot to create or fork from (``live``: see
        ``Sandbox.snapshot``)."""
        return await self._call(lambda: self.sync.snapshot(name, live=live))

    async def fork(self, *, live: bool = False) -> AsyncSandbox:
        """A new sandbox from its current state (copy-on-write; ``live``: see ``Sandbox.fork``)."""
        child: Sandbox = await self._call(lambda: self.sync.fork(live=live))
        return AsyncSandbox(child, self._backend)

    async def close(self) -> None:
        """Close the sandbox and everything running in it. Idempotent."""
        self._backend._live.discard(self)
        await self._call(self.sync.close)


class AsyncBackend(_Awaited):
    """A backend, awaited: ``build``, ``create`` and the rest of :class:`~pytest_sandbox.Backend`.

    Made by :func:`open_backend`, or around a backend already open (``AsyncBackend(backend)``,
    e.g. the ``sandbox_backend`` fixture's); ``sync`` is that backend. ``close()`` (or leaving
    ``async with``) closes every sandbox made through it, and the backend itself when
    :func:`open_backend` opened it (one passed in stays open for its owner).
    """

    def __init__(self, backend: Backend, *, max_threads: int = DEFAULT_THREADS, owned: bool = False) -> None:
        self.sync: Backend = backend
        self.name = backend.name
        self._owned = owned
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix=f"sandbox-aio-{backend.name}")
        self._live: set[AsyncSandbox] = set()

    async def build(
        self,
        image: Image,
        *,
        on_log: LogCallback | None = None,
        rebuild: bool | float = False,
        cache_from: str | None = None,
    ) -> Snapshot:
        """The snapshot of ``image``, built once per setup key (``on_log`` is called from a
        worker thread)."""
        return await self._call(lambda: self.sync.build(image, on_log=on_log, rebuild=rebuild, cache_from=cache_from))

    async def create(
        self,
        snapshot: Snapshot | Image | str,
        *,
        network: bool | Network | Sequence[str] = False,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
    ) -> AsyncSandbox:
        """A new sandbox forked from ``snapshot`` (an Image is built first; a string is a key)."""
        sb: Sandbox = await self._call(lambda: self.sync.create(snapshot, network=network, env=env, limits=limits))
        return AsyncSandbox(sb, self)

    async def push(self, snapshot: Snapshot | str, repository: str, *, on_log: LogCallback | None = None) -> str:
        """Push a snapshot to a registry; returns its reference."""
        return await self._call(lambda: self.sync.push(snapshot, repository, on_log=on_log))

    async def pull(self, reference: str, *, on_log: LogCallback | None = None) -> Snapshot:
        """Pull a pushed snapshot."""
        return await self._call(lambda: self.sync.pull(reference, on_log=on_log))

    async def get_snapshot(self, key_or_name: str) -> Snapshot:
        """A snapshot by key (or a unique prefix) or name."""
        return await self._call(lambda: self.sync.get_snapshot(key_or_name))

    async def snapshots(self) -> list[Snapshot]:
        """Every snapshot this backend has."""
        return await self._call(lambda: list(self.sync.snapshots()))

    async def remove_snapshot(self, snapshot: Snapshot | str) -> None:
        """Delete a snapshot."""
        await self._call(lambda: self.sync.remove_snapshot(snapshot))

    async def usage(self, snapshot: Snapshot) -> Usage:
        """What ``snapshot`` costs where it is kept."""
        return await self._call(lambda: self.sync.usage(snapshot))

    async def prune(self, older_than: float = 0.0) -> list[str]:
        """Delete snapshots older than ``older_than`` seconds; returns their keys."""
        return await self._call(lambda: self.sync.prune(older_than))

    async def gc(self, *, wait: bool = True) -> int:
        """Remove what dead sessions left; returns how many (``wait=False``: see :meth:`Store.gc`)."""
        return await self._call(lambda: self.sync.gc(wait=wait))

    async def close(self) -> None:
        """Close every sandbox made through this, and the backend if :func:`open_backend` opened it."""
        try:
            for sb in list(self._live):
                await sb.close()
            if self._owned:
                await self._call(self.sync.close)
            aclose = getattr(self.sync, "aclose", None)
            if aclose is not None:  # the backend's clients of this event loop (AsyncDaytona)
                await aclose()
        finally:
            self._pool.shutdown(wait=False)


class _Opening:
    """What :func:`open_backend` returns: awaited, or entered with ``async with``."""

    def __init__(self, name: str, max_threads: int, options: dict[str, Any]) -> None:
        self._name, self._threads, self._options = name, max_threads, options
        self._backend: AsyncBackend | None = None

    async def _open(self) -> AsyncBackend:
        # Off the loop: opening may start helpers or ask a remote API.
        sync = await offload(None, lambda: _open_sync(self._name, **self._options))
        return AsyncBackend(sync, max_threads=self._threads, owned=True)

    def __await__(self) -> Generator[Any, None, AsyncBackend]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncBackend:
        self._backend = await self._open()
        return self._backend

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._backend is not None:
            await self._backend.close()


def open_backend(name: str = "local", *, max_threads: int = DEFAULT_THREADS, **options: Any) -> _Opening:
    """Open a backend for the async API: ``async with aio.open_backend("docker") as backend``,
    or ``backend = await aio.open_backend(...)`` (then ``await backend.close()``). Options are
    :func:`pytest_sandbox.open_backend`'s."""
    return _Opening(name, max_threads, options)
