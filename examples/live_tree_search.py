"""The tree search of ``tree_search.py`` over a live Python REPL: the state lives only in the
REPL's memory, and every branch continues that very process (a live fork), not a fresh one.

An agent's REPL holds what it has computed, loaded and defined; replaying its history into a new
process for every branch costs the whole history again. A live snapshot keeps the process:
each branch starts from its parent's memory in a fraction of a second and diverges from there.

Needs the local engine as root with CRIU 4.2 or newer (see the README's "Live snapshots").

    sudo python examples/live_tree_search.py --target 37 --depth 4 --beam 2
"""

from __future__ import annotations

import argparse
import json
import time

from tree_search import Node, Result

from pytest_sandbox import Backend, Image, Sandbox, Snapshot, open_backend

# Statements the agent may run in its REPL; the state is the REPL's variable x.
ACTIONS = {"add 1": "x += 1", "add 5": "x += 5", "double": "x *= 2", "minus 3": "x -= 3"}

REPL = """
import socket
namespace = {"x": 1}
server = socket.socket(socket.AF_UNIX)
server.bind("/run/repl.sock")
server.listen(8)
while True:
    conn, _ = server.accept()
    with conn:
        try:
            exec(conn.recv(65536).decode(), namespace)
            conn.sendall(repr(namespace["x"]).encode())
        except Exception as exc:
            conn.sendall(f"error: {exc!r}".encode())
"""
CLIENT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('/run/repl.sock'); "
    "s.sendall(sys.argv[1].encode()); print(s.recv(65536).decode())"
)


def repl_image(base: Image | None = None) -> Image:
    """A base with python3, and the REPL frozen running (a live service)."""
    return (
        (base or Image.host())
        .run(f"mkdir -p /work && cat > /work/repl.py <<'EOF'\n{REPL}\nEOF")
        .service("repl", start="exec python3 /work/repl.py", ready="test -S /run/repl.sock", live=True)
    )


def run(sb: Sandbox, statement: str) -> str:
    """Run ``statement`` in the sandbox's REPL; the value of x after it."""
    res = sb.exec(["python3", "-c", CLIENT, statement], timeout=60)
    res.check()
    return res.stdout.strip()


def search(backend: Backend, root: Snapshot, *, target: int, depth: int, beam: int) -> Result:
    """Beam search: each action runs in a live fork of its parent's REPL; the child's state is a
    live snapshot of that fork, which the next level forks again."""
    frontier = [Node(root, [], 1, -abs(target - 1))]
    best = frontier[0]
    taken: list[Snapshot] = []
    explored = 0
    for _ in range(depth):
        children = []
        for node in frontier:
            for name, statement in ACTIONS.items():
                with backend.create(node.snapshot) as sb:  # the parent's REPL, continued
                    value = int(run(sb, statement))
                    child = Node(sb.snapshot(live=True), [*node.path, name], value, -abs(target - value))
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
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--beam", type=int, default=2)
    args = ap.parse_args()
    with open_backend("local") as backend:
        root = backend.build(repl_image())
        t = time.perf_counter()
        result = search(backend, root, target=args.target, depth=args.depth, beam=args.beam)
        elapsed = time.perf_counter() - t
        for snap in result.snapshots:
            backend.remove_snapshot(snap)
    out = {"best_path": result.best_path, "value": result.best_value, "states_explored": result.explored}
    print(json.dumps({**out, "seconds": round(elapsed, 2)}, indent=1))


if __name__ == "__main__":
    main()
