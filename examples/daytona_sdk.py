"""Plain Daytona SDK code, no pytest-sandbox API: it runs against Daytona, or offline against the
local endpoint (`pytest-sandbox serve --daytona`):

    pytest-sandbox serve --daytona &
    DAYTONA_API_URL=http://127.0.0.1:3986/api DAYTONA_API_KEY=local python examples/daytona_sdk.py

It builds a snapshot, creates three sandboxes from it, runs a command in each, forks one and
snapshots the fork, then cleans up. Everything printed comes from the sandboxes.
"""

from __future__ import annotations

import os
import sys
import uuid

from daytona import CreateSandboxFromSnapshotParams, CreateSnapshotParams, Daytona, Image


def main() -> int:
    daytona = Daytona()  # DAYTONA_API_KEY / DAYTONA_API_URL / DAYTONA_TARGET from the environment
    tag = uuid.uuid4().hex[:8]
    base = os.environ.get("EXAMPLE_BASE_IMAGE", "debian:bookworm")
    image = Image.base(base).run_commands("mkdir -p /app && echo 42 > /app/answer.txt")
    snapshot = daytona.snapshot.create(
        CreateSnapshotParams(name=f"example-{tag}", image=image), on_logs=lambda line: print("build:", line)
    )
    print(f"snapshot {snapshot.name}: {snapshot.state}")
    sandboxes, forked_snapshot = [], f"example-{tag}-forked"
    try:
        for i in range(3):
            sb = daytona.create(CreateSandboxFromSnapshotParams(snapshot=snapshot.name, labels={"example": tag}))
            sandboxes.append(sb)
            res = sb.process.exec(f"echo sandbox {i}: $(cat /app/answer.txt) on $(uname -n)")
            print(f"exec in {sb.id[:8]} -> exit {res.exit_code}: {res.result.strip()!r}")
        fork = sandboxes[0].fork()
        sandboxes.append(fork)
        fork.process.exec("echo 'forked state' > /app/note.txt")
        fork.create_snapshot(forked_snapshot)
        print(f"forked {sandboxes[0].id[:8]} -> {fork.id[:8]}, snapshot {forked_snapshot}")
        again = daytona.create(CreateSandboxFromSnapshotParams(snapshot=forked_snapshot))
        sandboxes.append(again)
        print("from the fork's snapshot:", again.fs.download_file("/app/note.txt").decode().strip())
        print("the original is untouched:", sandboxes[1].process.exec("ls /app").result.split())
    finally:
        for sb in sandboxes:
            sb.delete()
        for name in (forked_snapshot, snapshot.name):
            try:
                daytona.snapshot.delete(daytona.snapshot.get(name))
            except Exception as exc:  # the forked snapshot is missing if an earlier step failed
                print(f"cleanup: {name}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
