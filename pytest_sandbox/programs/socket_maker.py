"""Makes TCP sockets inside sandboxes' network namespaces (see ``engine/expose.py``).

argv[1]: the fd of its Unix socket. Each request is a pid; the answer is ``ok`` with a new,
unconnected TCP socket of that process's network namespace, or ``error: WHY``.
"""

import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ch = socket.socket(fileno=int(sys.argv[1]))
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    while True:
        msg = ch.recv(64)
        if not msg:
            break
        try:
            fd = os.open(f"/proc/{int(msg)}/ns/net", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                libc.setns(home, CLONE_NEWNET)
                os.close(fd)
            socket.send_fds(ch, [b"ok"], [s.fileno()])
            s.close()
        except Exception as exc:
            ch.send(f"error: {exc}".encode())


if __name__ == "__main__":
    main()
