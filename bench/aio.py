"""Async API bench (issue 16): many execs from one event loop, side by side with the same execs
one after another, and with the sync API on threads of the caller's own.

    python bench/aio.py [--backend local] [--sandboxes 10] [--per 5] [--sleep 1.0] [--cache DIR]

Rows, in one run on one set of sandboxes (``--sandboxes`` sandboxes, ``--per`` execs of
``sleep --sleep`` in each):

- async gather: every exec awaited at once through ``pytest_sandbox.aio``;
- sync threads: the same through ``Sandbox.exec`` on a ThreadPoolExecutor of that size (what a
  caller without the async API writes);
- serial: one after another (the sum of the work);
- cancel: cancelling an awaiting exec of ``sleep 600`` until its tree is gone (p50 of 10).

The ratio of each row to the slowest single exec says how close to "the time of the slowest"
the run came. Nothing here asserts; the machine is shared and noisy. The docker backend needs a
Docker engine; the daytona one a Daytona API (``pytest-sandbox serve``) in DAYTONA_API_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from pytest_sandbox import Image, Sandbox, aio, open_backend


async def gather(sbs: list[aio.AsyncSandbox], per: int, cmd: str) -> float:
    t = time.perf_counter()
    await asyncio.gather(*(sb.exec(cmd) for sb in sbs for _ in range(per)))
    return time.perf_counter() - t


def threads(sbs: list[Sandbox], per: int, cmd: str) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(len(sbs) * per) as pool:
        list(pool.map(lambda sb: sb.exec(cmd), [sb for sb in sbs for _ in range(per)]))
    return time.perf_counter() - t


async def cancel_once(sb: aio.AsyncSandbox) -> float:
    task = asyncio.ensure_future(sb.exec("sleep 600"))
    await asyncio.sleep(0.3)
    t = time.perf_counter()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return time.perf_counter() - t


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--backend", default="local", choices=["local", "docker", "daytona"])
    ap.add_argument("--sandboxes", type=int, default=10)
    ap.add_argument("--per", type=int, default=5)
    ap.add_argument("--sleep", type=float, default=1.0)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    cmd = f"sleep {args.sleep}"
    image = Image.host() if args.backend == "local" else Image.debian("bookworm")
    with open_backend(args.backend, **({"cache_dir": args.cache} if args.cache else {})) as sync:
        async with aio.AsyncBackend(sync) as backend:
            snap = await backend.build(image)
            sbs = list(await asyncio.gather(*(backend.create(snap) for _ in range(args.sandboxes))))
            await gather(sbs, 1, "true")  # warm: first execs pay for lookups and connections
            one = min([await gather(sbs[:1], 1, cmd) for _ in range(3)])
            rows = {
                "async gather": await gather(sbs, args.per, cmd),
                "sync threads": await asyncio.to_thread(threads, [s.sync for s in sbs], args.per, cmd),
                "serial": sum(
                    [await gather(sbs[i % len(sbs) : i % len(sbs) + 1], 1, cmd) for i in range(len(sbs) * args.per)]
                ),
            }
            cancels = [await cancel_once(sbs[0]) for _ in range(10)]
    n = args.sandboxes * args.per
    print(f"{args.backend}: {n} execs of `{cmd}` across {args.sandboxes} sandboxes; one alone takes {one:.3f}s")
    print(f"{'row':<14} {'seconds':>8} {'x one exec':>11}")
    for name, secs in rows.items():
        print(f"{name:<14} {secs:8.3f} {secs / one:10.2f}x")
    print(
        f"async gather is {rows['serial'] / rows['async gather']:.1f}x faster than serial, "
        f"{rows['sync threads'] / rows['async gather']:.2f}x the time of sync threads"
    )
    p50, top = statistics.median(cancels) * 1000, max(cancels) * 1000
    print(f"cancel until the tree is dead: p50 {p50:.1f} ms, max {top:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
