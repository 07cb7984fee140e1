"""The daytona backend's side of the async API: the SDK's ``AsyncDaytona`` clients, one per
event loop (an aiohttp session belongs to the loop that made it), and its calls with the same
retries and errors as the sync ones."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._daytona_exec import RETRIES, retry_delay

__all__ = ["AsyncClients"]

_T = TypeVar("_T")


class AsyncClients:
    """``AsyncDaytona`` clients for a backend, made on first use in each event loop, and the
    SDK's handle of every sandbox looked up through them."""

    def __init__(self, sdk: Any, api_url: str, target: str | None) -> None:
        self._sdk, self._api_url, self._target = sdk, api_url, target
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[Any, dict[str, Any]]] = {}

    async def call(self, what: str, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        """One awaited SDK call: rate limiting backs off and retries; other failures become
        errors that say what failed and what to do (as the sync calls' do)."""
        for attempt in range(RETRIES):
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                await asyncio.sleep(retry_delay(self._sdk, exc, what, self._api_url, self._target, attempt))
        raise AssertionError("unreachable")

    async def sandbox(self, sandbox_id: str) -> Any:
        """The ``AsyncSandbox`` of ``sandbox_id`` in the running loop."""
        loop = asyncio.get_running_loop()
        if loop not in self._by_loop:
            self._by_loop[loop] = (self._sdk.AsyncDaytona(), {})
        client, handles = self._by_loop[loop]
        if sandbox_id not in handles:
            handles[sandbox_id] = await self.call("look up a sandbox", client.get, sandbox_id)
        return handles[sandbox_id]

    def forget(self, sandbox_id: str) -> None:
        """Drop a deleted sandbox's handles."""
        for _, handles in self._by_loop.values():
            handles.pop(sandbox_id, None)

    async def close(self) -> None:
        """Close the running loop's client (its HTTP session)."""
        entry = self._by_loop.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[0].close()
