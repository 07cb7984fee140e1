"""Holds the user namespace of a backend's sandboxes (see ``engine/host.py``): it creates it,
writes ``u`` to its stdout once it has, and the runner then writes its id maps.

argv: ``root STORE MOUNT_POINT``: first a private mount namespace (owned by the host's user
namespace, invisible to the host) with the store bind-mounted at MOUNT_POINT, then the user
namespace; or ``rootless [NPROC HARD]``: a user and a mount namespace together, under that
RLIMIT_NPROC when given (the namespace keeps the one its creator had). On failure it writes
what failed and exits 1.
"""

import ctypes
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000

libc = ctypes.CDLL(None, use_errno=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        os.write(1, f"{what}: {os.strerror(ctypes.get_errno())}".encode())
        sys.exit(1)


def main() -> None:
    mode, *rest = sys.argv[1:]
    if mode == "root":
        store, at = rest
        check(libc.unshare(CLONE_NEWNS) == 0, "unshare mount namespace")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0, "make mounts private")
        check(libc.mount(store.encode(), at.encode(), None, MS_BIND, None) == 0, "bind the store")
        check(libc.unshare(CLONE_NEWUSER) == 0, "unshare")
    else:
        if rest:
            nproc, hard = (int(x) for x in rest)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, hard))
        check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0, "unshare")
    os.write(1, b"u")


if __name__ == "__main__":
    main()
