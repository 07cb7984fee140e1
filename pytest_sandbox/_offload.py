"""Blocking calls made from asyncio: run on a thread pool so the event loop never waits, and a
cancellation that stops the call before it is passed on.

A thread cannot be cancelled, so cancelling a task awaiting :func:`stoppable` sets the call's
:class:`~pytest_sandbox._proc.Cancel` (which kills the command's process tree) and waits for
the thread to return: when the ``CancelledError`` reaches the caller, nothing it started runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from ._proc import Cancel

__all__ = ["offload", "stoppable", "unstoppable"]

T = TypeVar("T")


async def offload(executor: Executor | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on ``executor``, with the caller's context variables."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


async def stoppable(executor: Executor | None, fn: Callable[[Cancel], T]) -> T:
    """``fn(cancel)`` on ``executor``. If the awaiting task is cancelled, ``cancel`` is set and
    the cancellation is passed on only once ``fn`` has returned (it must return soon after)."""
    cancel = Cancel()
    fut = asyncio.ensure_future(offload(executor, fn, cancel))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(Exception):  # the call's own outcome does not matter any more
            await unstoppable(fut)
        raise
    finally:
        cancel.close()  # the call has returned: nothing polls it any more


async def unstoppable(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the awaiting task is cancelled meanwhile; a cancellation
    that came is passed on after. For the clean-up a cancellation itself starts."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not fut.cancelled():
            fut.exception()  # retrieved, so that asyncio does not log it as lost
        raise asyncio.CancelledError
    return fut.result()
