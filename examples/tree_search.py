"""Search a tree of real states: from one snapshot, try candidate actions each in its own fork,
snapshot what they produce, recurse from the best, and keep the best score seen.

The "environment" here is a shell state (a number in /work/state, changed by real commands), a
stand-in for an agent editing a repository: the point is that every branch runs for real, in
isolation, starting from an exact frozen state, and costs milliseconds to fork.

    python examples/tree_search.py --target 37 --depth 5 --beam 3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from pytest_sandbox import Backend, Image, Snapshot, open_backend

ACTIONS = {
    "add 1": "echo $(( $(cat /work/state) + 1 )) > /work/state",
    "add 5": "echo $(( $(cat /work/state) + 5 )) > /work/state",
    "double": "echo $(( $(cat /work/state) * 2 )) > /work/state",
    "minus 3": "echo $(( $(cat /work/state) - 3 )) > /work/state",
}


@dataclass
class Node:
    snapshot: Snapshot
    path: list[str]
    value: int
    score: int


@dataclass
class Result:
    best_path: list[str]
    best_value: int
    best_score: int
    explored: int
    snapshots: list[Snapshot] = field(default_factory=list)


def start_image(base: Image | None = None) -> Image:
    return (base or Image.host()).run("mkdir -p /work && echo 1 > /work/state")


def search(backend: Backend, root: Snapshot, *, target: int, depth: int, beam: int) -> Result:
    """Beam search: expand every action of the `beam` best states, `depth` levels deep."""

    def score(value: int) -> int:
        return -abs(target - value)

    frontier = [Node(root, [], 1, score(1))]
    best = frontier[0]
    explored = 0
    taken: list[Snapshot] = []
    for _ in range(depth):
        children = []
        for node in frontier:
            for name, command in ACTIONS.items():
                with backend.create(node.snapshot) as sb:  # a fresh fork of that exact state
                    sb.exec(command).check()
                    value = int(sb.fs.read_text("/work/state"))
                    child = Node(sb.snapshot(), [*node.path, name], value, score(value))
                taken.append(child.snapshot)
                children.append(child)
                explored += 1
                if child.score > best.score:
                    best = child
        if best.score == 0:
            break
        frontier = sorted(children, key=lambda n: n.score, reverse=True)[:beam]
    return Result(best.path, best.value, best.score, explored, taken)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=int, default=37)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--beam", type=int, default=3)
    args = ap.parse_args()
    with open_backend("local") as backend:
        root = backend.build(start_image())
        t = time.perf_counter()
        result = search(backend, root, target=args.target, depth=args.depth, beam=args.beam)
        elapsed = time.perf_counter() - t
        for snap in result.snapshots:
            backend.remove_snapshot(snap)
    print(
        json.dumps(
            {
                "best_path": result.best_path,
                "value": result.best_value,
                "score": result.best_score,
                "states_explored": result.explored,
                "seconds": round(elapsed, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
