"""Removes a session's containers once its stdin closes (the runner exited or was killed).

argv[1]: the owner label's value (``pytest-sandbox.owner``).
"""

import contextlib
import sys


def main() -> None:
    sys.stdin.buffer.read()
    import docker  # only now: the runner may have gone without ever needing this

    client = docker.from_env()
    for c in client.containers.list(
        all=True, ignore_removed=True, filters={"label": "pytest-sandbox.owner=" + sys.argv[1]}
    ):
        with contextlib.suppress(Exception):
            c.remove(force=True)


if __name__ == "__main__":
    main()
