"""Writing into host directories without following anything a sandbox planted there.

Every entry is created below an already-open directory fd with ``O_NOFOLLOW``: a symlink that a
sandbox (or a tar stream from a remote sandbox) put on the host side is replaced, never written
through. Shared by the local engine's ``fs.download``, the remote backends' downloads and layer
unpacking.

Core module: imports only :mod:`.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import IO

from .errors import SandboxFileError

__all__ = ["DIR_FLAGS", "ENTRY_COST", "HostTree", "clear", "rmtree_at", "spend"]

ENTRY_COST = 4096
"""Bytes of a size budget each directory entry costs (so a million empty files is not free)."""
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def spend(budget: list[int], n: int, path: str) -> None:
    """Take ``n`` bytes from a download's budget; past it the download stops."""
    budget[0] -= n
    if budget[0] < 0:
        raise SandboxFileError(errno.EFBIG, f"download {path}: larger than max_size; pass a larger max_size")


def clear(pfd: int, name: str, keep_dir: bool) -> None:
    """Remove whatever host entry is at ``name`` (a directory is kept when ``keep_dir``)."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            rmtree_at(pfd, name)
    else:
        os.unlink(name, dir_fd=pfd)


class HostTree:
    """Writes a tree that came out of a sandbox (``SafeFS.download``, a remote backend's tar
    stream) to the host path ``dest``; ``path`` is the sandbox path it came from, for messages.

    Every entry is created below an open directory
    fd with ``O_NOFOLLOW``, host entries in the way are replaced (never followed), modes lose
    setuid and setgid, and past ``max_size`` bytes (4 KiB counted per entry) it stops with
    :class:`SandboxFileError`. ``parts`` are path components below ``dest`` (``()`` is ``dest``).
    """

    def __init__(self, dest: Path, max_size: int, path: str) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._top = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._name = dest.name
        self._budget = [max_size]
        self.path = path

    def close(self) -> None:
        os.close(self._top)

    def _parent(self, parts: tuple[str, ...]) -> tuple[int, str]:
        """An fd of the directory holding ``parts`` (made, and links in the way replaced), and
        the last name."""
        names = (self._name, *parts)
        fd = os.dup(self._top)
        try:
            for name in names[:-1]:
                clear(fd, name, keep_dir=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd, names[-1]
        except BaseException:
            os.close(fd)
            raise

    def directory(self, parts: tuple[str, ...], mode: int) -> None:
        spend(self._budget, ENTRY_COST, self.path)
        pfd, name = self._parent(parts)
        try:
            clear(pfd, name, keep_dir=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=pfd)
            dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                os.fchmod(dfd, (mode & 0o777) | stat.S_IRWXU)
            finally:
                os.close(dfd)
        finally:
            os.close(pfd)

    def file(self, parts: tuple[str, ...], mode: int, data: IO[bytes] | None) -> None:
        """``data``: a binary file object to copy from (None for an empty file)."""
        spend(self._budget, ENTRY_COST, self.path)
        pfd, name = self._parent(parts)
        try:
            clear(pfd, name, keep_dir=False)
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                while data is not None and (chunk := data.read(1 << 20)):
                    spend(self._budget, len(chunk), self.path)
                    os.write(out, chunk)
                os.fchmod(out, mode & 0o777)  # never setuid/setgid on the host
            finally:
                os.close(out)
        finally:
            os.close(pfd)

    def symlink(self, parts: tuple[str, ...], target: str) -> None:
        spend(self._budget, ENTRY_COST, self.path)
        pfd, name = self._parent(parts)
        try:
            clear(pfd, name, keep_dir=False)
            os.symlink(target, name, dir_fd=pfd)
        finally:
            os.close(pfd)


def rmtree_at(pfd: int, name: str) -> None:
    """Remove the tree ``name`` below the open directory ``pfd``, following no symlink."""
    dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        for child in os.listdir(dfd):
            st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                rmtree_at(dfd, child)
            else:
                os.unlink(child, dir_fd=dfd)
    finally:
        os.close(dfd)
    os.rmdir(name, dir_fd=pfd)
