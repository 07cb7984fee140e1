"""Where a sandbox's user and group ids land on the host.

Rootless, a sandbox's user namespace maps only the caller (root inside is you outside). As root,
mapping every id to itself would make root inside host root for everything that checks a uid
rather than a capability (``/proc/sys``, files owned by root, signals). So root's sandboxes map
ids 0..65535 onto an unprivileged range, as rootful podman's ``--userns=auto`` and docker's
``userns-remap`` do; layers are owned by ids of that range (shifted when they are unpacked).

The range is the ``pytest-sandbox`` entry of ``/etc/subuid`` and ``/etc/subgid`` when there is one
of at least 65536 ids, else ids from 2130706432 (0x7f000000), which no distribution hands out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_BASE", "IdMap", "acting_as", "root_map", "subordinate"]

DEFAULT_BASE = 0x7F000000
COUNT = 65536


@dataclass(frozen=True)
class IdMap:
    """Inside id ``n`` is host id ``uid_base + n`` (``gid_base + n`` for groups), for ``n < count``."""

    uid_base: int
    gid_base: int
    count: int = COUNT

    def uid(self, n: int) -> int:
        return self.uid_base + (n if 0 <= n < self.count else 65534)

    def gid(self, n: int) -> int:
        return self.gid_base + (n if 0 <= n < self.count else 65534)

    def inside_uid(self, host: int) -> int:
        """The id a host uid of this range has inside (the overflow id 65534 for others)."""
        return host - self.uid_base if 0 <= host - self.uid_base < self.count else 65534

    def inside_gid(self, host: int) -> int:
        return host - self.gid_base if 0 <= host - self.gid_base < self.count else 65534

    @property
    def root(self) -> tuple[int, int]:
        """Host uid and gid of root inside."""
        return self.uid_base, self.gid_base

    def uid_map(self) -> str:
        return f"0 {self.uid_base} {self.count}\n"

    def gid_map(self) -> str:
        return f"0 {self.gid_base} {self.count}\n"

    def shift_tree(self, root: Path) -> None:
        """Move every owner of a freshly unpacked tree (owned by host ids) into this range.

        chown clears setuid and setgid bits, so the mode is set again afterwards; nothing below
        ``root`` is followed (symlinks are chowned themselves).
        """
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                self._shift(os.path.join(dirpath, name))
        self._shift(str(root))

    def _shift(self, path: str) -> None:
        st = os.lstat(path)
        os.chown(path, self.uid(st.st_uid), self.gid(st.st_gid), follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))


def subordinate(path: str, *names: str) -> tuple[int, int] | None:
    """``(start, count)`` of the first range of at least 65536 ids that one of ``names`` (a user
    name or uid) has in ``path`` (``/etc/subuid`` or ``/etc/subgid``); a malformed line is skipped."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) != 3 or parts[0] not in names:
                continue
            with contextlib.suppress(ValueError):
                start, count = int(parts[1]), int(parts[2])
                if count >= COUNT:
                    return start, count
    return None


def _covered(path: str, start: int, count: int) -> bool:
    """True when our own user namespace maps host ids ``start .. start+count-1`` (it is the
    host's, or a container's that gave us that range); else we cannot hand them out."""
    try:
        rows = [tuple(int(x) for x in line.split()) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return False
    return any(inside <= start and start + count <= inside + n for inside, _, n in rows)


def root_map() -> IdMap | None:
    """The id range root's sandboxes use (see the module docstring), or None where this process
    cannot map one (root of a user namespace that maps only itself): then, as rootless, a
    sandbox maps only the caller."""
    uid = subordinate("/etc/subuid", "pytest-sandbox")
    gid = subordinate("/etc/subgid", "pytest-sandbox")
    ids = IdMap(DEFAULT_BASE if uid is None else uid[0], DEFAULT_BASE if gid is None else gid[0])
    if os.geteuid() != 0 or not (
        _covered("/proc/self/uid_map", ids.uid_base, ids.count)
        and _covered("/proc/self/gid_map", ids.gid_base, ids.count)
    ):
        return None
    return ids


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_CAP_V3 = 0x20080522
_local = threading.local()


@contextlib.contextmanager
def acting_as(ids: tuple[int, int] | None) -> Iterator[None]:
    """Create files as host ``ids`` (sandbox root's) in this thread only, keeping our capabilities.

    A sandbox's overlay is mounted in its user namespace, where host root is unmapped: the
    kernel refuses (EOVERFLOW) to create an inode there for host root. The filesystem ids are
    per thread, so the rest of the process is unaffected; setting them drops the file
    capabilities, which are raised again from the permitted set, so root still acts as root.
    """
    if ids is None or getattr(_local, "active", False):
        yield
        return
    hdr = _CapHeader(_CAP_V3, 0)
    caps = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), caps) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    old_uid = _libc.setfsuid(ids[0])
    old_gid = _libc.setfsgid(ids[1])
    _local.active = True
    try:
        if _libc.capset(ctypes.byref(hdr), caps) != 0:
            raise OSError(ctypes.get_errno(), "capset")
        yield
    finally:
        _local.active = False
        _libc.setfsgid(old_gid)
        _libc.setfsuid(old_uid)
        _libc.capset(ctypes.byref(hdr), caps)
