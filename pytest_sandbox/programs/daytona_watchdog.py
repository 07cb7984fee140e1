"""Deletes a session's Daytona sandboxes once its stdin closes (the runner exited or was killed).

argv[1]: the session label's value (``pytest-sandbox.session``).
"""

import contextlib
import sys


def main() -> None:
    sys.stdin.buffer.read()
    from daytona import Daytona, ListSandboxesQuery  # only now: the runner may never have needed it

    d = Daytona()
    for sb in list(d.list(ListSandboxesQuery(labels={"pytest-sandbox.session": sys.argv[1]}))):
        with contextlib.suppress(Exception):
            sb.delete()


if __name__ == "__main__":
    main()
