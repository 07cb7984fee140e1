"""Mounts on request, in the user-namespace helper's mount namespace (as root there): a loop
device set up with LOOP_CONFIGURE (autoclear: it detaches when its last mount goes), or a tmpfs;
and lazy unmounts. In-process, this costs a millisecond where ``nsenter mount -o loop`` costs
fifteen (see ``engine/disk.py``).

argv[1]: the fd of its Unix socket. Requests are ``OP\\0A\\0B``: ``ext4\\0IMAGE\\0TARGET``,
``tmpfs\\0OPTIONS\\0TARGET`` or ``umount\\0TARGET\\0``; the answer is ``ok`` or ``error: WHY``.
"""

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

MS_NOSUID, MS_NODEV, MS_NOATIME = 2, 4, 1024
FLAGS = MS_NOSUID | MS_NODEV | MS_NOATIME
MNT_DETACH = 2
LOOP_CTL_GET_FREE, LOOP_CONFIGURE, LO_FLAGS_AUTOCLEAR = 0x4C82, 0x4C0A, 4

libc = ctypes.CDLL(None, use_errno=True)


def fail(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def ext4(image: str, target: str) -> None:
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(50):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = os.open(f"/dev/loop{n}", os.O_RDWR | os.O_CLOEXEC)
            img = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            config = bytearray(304)  # struct loop_config: fd, block size, loop_info64 (lo_flags at 60)
            struct.pack_into("I", config, 0, img)
            struct.pack_into("I", config, 60, LO_FLAGS_AUTOCLEAR)
            try:
                fcntl.ioctl(dev, LOOP_CONFIGURE, bytes(config))
            except OSError as exc:
                os.close(dev)
                if exc.errno == errno.EBUSY:  # another process took it first
                    continue
                raise
            finally:
                os.close(img)
            try:
                if libc.mount(f"/dev/loop{n}".encode(), target.encode(), b"ext4", FLAGS, None) != 0:
                    fail("mount")
            finally:
                os.close(dev)
            return
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(ctl)


def main() -> None:
    ch = socket.socket(fileno=int(sys.argv[1]))
    while True:
        msg = ch.recv(4096)
        if not msg:
            break
        op, a, b = msg.decode().split("\0")
        try:
            if op == "ext4":
                ext4(a, b)
            elif op == "tmpfs":
                if libc.mount(b"sandbox-disk", b.encode(), b"tmpfs", FLAGS & ~MS_NOATIME, a.encode()) != 0:
                    fail("mount tmpfs")
            elif libc.umount2(a.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
                fail("umount")
            ch.send(b"ok")
        except Exception as exc:
            ch.send(f"error: {exc}".encode())


if __name__ == "__main__":
    main()
