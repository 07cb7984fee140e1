"""The tree search of ``tree_search.py`` on the async API: every level's branches run at once,
each in its own fork, from one event loop, the way an async agent framework explores.

    python examples/async_tree_search.py --target 37 --depth 5 --beam 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from tree_search import ACTIONS, Node, Result, start_image

from pytest_sandbox import Snapshot, aio


async def expand(backend: aio.AsyncBackend, node: Node, name: str, command: str, target: int) -> Node:
    """One branch: fork the node's exact state, act, and snapshot what it made."""
    async with await backend.create(node.snapshot) as sb:
        (await sb.exec(command)).check()
        value = int(await sb.fs.read_text("/work/state"))
        return Node(await sb.snapshot(), [*node.path, name], value, -abs(target - value))


async def search(backend: aio.AsyncBackend, root: Snapshot, *, target: int, depth: int, beam: int) -> Result:
    """Beam search as in ``tree_search.search``, a level's branches explored concurrently."""
    frontier = [Node(root, [], 1, -abs(target - 1))]
    best = frontier[0]
    taken: list[Snapshot] = []
    for _ in range(depth):
        children = await asyncio.gather(
            *(expand(backend, node, name, cmd, target) for node in frontier for name, cmd in ACTIONS.items())
        )
        taken += [c.snapshot for c in children]
        # The same tie-break as the sync search: the first best in exploration order wins.
        for child in children:
            if child.score > best.score:
                best = child
        if best.score == 0:
            break
        frontier = sorted(children, key=lambda n: n.score, reverse=True)[:beam]
    return Result(best.path, best.value, best.score, len(taken), taken)


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--target", type=int, default=37)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--beam", type=int, default=3)
    args = ap.parse_args()
    async with aio.open_backend("local") as backend:
        root = await backend.build(start_image())
        t = time.perf_counter()
        result = await search(backend, root, target=args.target, depth=args.depth, beam=args.beam)
        elapsed = time.perf_counter() - t
        for snap in result.snapshots:
            await backend.remove_snapshot(snap)
    summary = {"best_path": result.best_path, "value": result.best_value, "score": result.best_score}
    print(json.dumps({**summary, "states_explored": result.explored, "seconds": round(elapsed, 2)}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
