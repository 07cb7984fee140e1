"""Writing into host directories without following anything a sandbox planted there, and walking
the trees a sandbox or an image made.

Every entry is created below an already-open directory fd with ``O_NOFOLLOW``: a symlink that a
sandbox (or a tar stream from a remote sandbox) put on the host side is replaced, never written
through. Shared by the local engine's ``fs.download``, the remote backends' downloads and layer
unpacking.

Trees are walked without recursion (:class:`TreeWalk`, :func:`rmtree_at`): a sandbox can make a
directory thousands of levels deep with ``mkdir d; cd d``, deeper than Python's recursion limit,
and the store must still copy it, check it and delete it. Files are copied with their holes
(:func:`copy_data`), so a sparse file costs the store only the blocks that were written.

Core module: imports only :mod:`.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import SandboxFileError

__all__ = ["DIR_FLAGS", "ENTRY_COST", "DirChain", "HostTree", "TreeWalk", "clear", "copy_data", "rmtree_at", "spend"]

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


class DirChain:
    """Open directory fds along a path below ``root`` (the caller's fd, never closed here).

    Any depth with few fds: the last ``_SPAN`` levels are held, and above them every
    ``_SPAN``-th. A level let go is opened again from the one held above it, by name and without
    following links, and must be the directory it was (device and inode), else ``ESTALE``.
    """

    _SPAN = 64

    def __init__(self, root: int) -> None:
        st = os.fstat(root)
        self._fds: list[int | None] = [root]
        self._ids = [(st.st_dev, st.st_ino)]
        self.names: list[str] = []

    @property
    def fd(self) -> int:
        """The deepest directory's fd (valid until the next :meth:`push` or :meth:`pop`)."""
        fd = self._fds[-1]
        assert fd is not None
        return fd

    def push(self, name: str) -> None:
        """Go down into the directory ``name`` of the current one (``O_NOFOLLOW``: never a link)."""
        fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(fd)
        self._fds.append(fd)
        self._ids.append((st.st_dev, st.st_ino))
        self.names.append(name)
        old = len(self._fds) - 1 - self._SPAN
        held = self._fds[old] if old > 0 else None
        if held is not None and old % self._SPAN:
            os.close(held)
            self._fds[old] = None

    def pop(self) -> str:
        """Go up one level; returns the name of the directory left."""
        fd = self._fds.pop()
        self._ids.pop()
        if fd is not None:
            os.close(fd)
        if self._fds[-1] is None:
            start = max(i for i, held in enumerate(self._fds) if held is not None)
            for i in range(start + 1, len(self._fds)):
                parent = self._fds[i - 1]
                assert parent is not None
                self._fds[i] = nfd = os.open(self.names[i - 1], DIR_FLAGS, dir_fd=parent)
                st = os.fstat(nfd)
                if (st.st_dev, st.st_ino) != self._ids[i]:
                    raise OSError(errno.ESTALE, f"{'/'.join(self.names[:i])} was replaced while it was being walked")
        return self.names.pop()

    def close(self) -> None:
        for fd in self._fds[1:]:
            if fd is not None:
                os.close(fd)
        del self._fds[1:], self._ids[1:], self.names[:]


class TreeWalk:
    """Depth first through the directory open at ``top`` (the caller's fd), without recursion.

    Iterating yields ``(name, st)`` (``lstat``) for each entry of the current directory, whose fd
    is :attr:`fd`, in name order; :meth:`enter` on a directory entry goes into it next. When a
    directory entered is done, ``("", None)`` is yielded while :attr:`fd` is still that directory;
    then the walk goes up, unless :meth:`up` was called already. Entries that vanish meanwhile
    are left out; :meth:`close` releases the fds.
    """

    def __init__(self, top: int) -> None:
        self._chain = DirChain(top)
        self._todo = [sorted(os.listdir(top), reverse=True)]

    @property
    def fd(self) -> int:
        return self._chain.fd

    @property
    def rel(self) -> str:
        """The current directory's path below the top, with a trailing ``/`` (``""`` at the top)."""
        return "".join(f"{n}/" for n in self._chain.names)

    def enter(self, name: str) -> None:
        self._chain.push(name)
        self._todo.append(sorted(os.listdir(self._chain.fd), reverse=True))

    def up(self) -> str:
        """Leave the current directory now; returns its name (:attr:`fd` is its parent's again)."""
        self._todo.pop()
        return self._chain.pop()

    def __iter__(self) -> Iterator[tuple[str, os.stat_result | None]]:
        while self._todo:
            names = self._todo[-1]
            if names:
                name = names.pop()
                try:
                    st = os.stat(name, dir_fd=self._chain.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield name, st
            elif len(self._todo) == 1:
                return
            else:
                depth = len(self._todo)
                yield "", None
                if len(self._todo) == depth:
                    self.up()

    def close(self) -> None:
        self._chain.close()


def _searchable(pfd: int, name: str, st: os.stat_result) -> None:
    """Give a directory of ours that a sandbox left without read, write or search permission
    those bits back, so it can be emptied (through an ``O_PATH`` fd: never through a link)."""
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_IRWXU == stat.S_IRWXU:
        return
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    finally:
        os.close(fd)


def rmtree_at(pfd: int, name: str) -> None:
    """Remove the tree ``name`` below the open directory ``pfd``, following no symlink.

    Any depth (no recursion, few fds); directories of ours without permission bits get them.
    """
    _searchable(pfd, name, os.stat(name, dir_fd=pfd, follow_symlinks=False))
    top = os.open(name, DIR_FLAGS, dir_fd=pfd)
    try:
        walk = TreeWalk(top)
        try:
            for child, st in walk:
                if st is None:
                    done = walk.up()
                    os.rmdir(done, dir_fd=walk.fd)
                elif stat.S_ISDIR(st.st_mode):
                    _searchable(walk.fd, child, st)
                    walk.enter(child)
                else:
                    os.unlink(child, dir_fd=walk.fd)
        finally:
            walk.close()
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=pfd)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from the start of ``src`` to the empty file ``dst``, holes as holes.

    Only the data extents are copied (``SEEK_DATA``/``SEEK_HOLE``, with ``copy_file_range``: a
    reflink where the filesystem shares extents), so a 10 TB file of one written byte costs one
    block. Where the filesystems cannot do either, it is read and written, and runs of zeros are
    skipped so they stay holes.
    """
    os.ftruncate(dst, size)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    return
                raise
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            while start < end:
                n = os.copy_file_range(src, dst, end - start, start, start)
                if n == 0:  # the file shrank meanwhile: what is left stays a hole
                    return
                start += n
            pos = end
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    zeros = bytes(1 << 20)
    pos = 0
    while pos < size and (chunk := os.pread(src, min(1 << 20, size - pos), pos)):
        if chunk != zeros[: len(chunk)]:
            os.pwrite(dst, chunk, pos)
        pos += len(chunk)
