"""Operations on overlayfs layer trees: copying a writable layer out, and squashing a stack.

A layer is a directory in overlayfs upper-layer format: a deleted path is a 0/0 character device
(a whiteout), and a directory that hides everything below it carries the ``user.overlay.opaque``
xattr (bwrap always mounts with ``userxattr``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from .._hostfs import DirChain, TreeWalk, copy_data, rmtree_at
from ..errors import SandboxError

OPAQUE = "user.overlay.opaque"
_SKIP_XATTRS = ("user.overlay.origin", "user.overlay.impure", "user.overlay.nlink")


def copy_tree(src: Path, dest: Path, top_only: bool = False) -> None:
    """Copy a writable layer out with modes, owners, xattrs, hard links and whiteouts.

    ``src`` is written by sandbox code, so nothing in it is trusted: every entry is opened
    relative to its parent's fd with ``O_NOFOLLOW`` (a symlink is copied as a link, never
    followed on the host), only regular files are read, and a directory swapped for a link
    mid-walk is refused rather than entered. Any depth is copied (the walk does not recurse), and
    a file's holes stay holes (a sparse file of terabytes costs the blocks written). Device nodes
    other than whiteouts, and sockets, are left out (a sandbox cannot make the first, and the
    second mean nothing in a snapshot). ``top_only`` copies only the attributes of ``src`` itself
    onto ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    sfd = os.open(src, _DIR_FLAGS)
    dfd = os.open(dest, _DIR_FLAGS)
    try:
        if not top_only:
            _copy_dir(sfd, dfd)
        _copy_meta_fd(sfd, dfd, os.fstat(sfd))
    except OSError as exc:
        raise SandboxError(
            f"copying layer {src} failed: {exc}; nothing was saved. Remove what the sandbox cannot keep "
            "(or what changes while it is copied) and take the snapshot again."
        ) from exc
    finally:
        os.close(sfd)
        os.close(dfd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_meta_fd(sfd: int, dfd: int, st: os.stat_result) -> None:
    with contextlib.suppress(PermissionError):
        os.fchown(dfd, st.st_uid, st.st_gid)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        for name in os.listxattr(sfd):
            if name not in _SKIP_XATTRS:
                os.setxattr(dfd, name, os.getxattr(sfd, name))
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_dir(sfd: int, dfd: int) -> None:
    """Copy what is below the directory ``sfd`` into the directory ``dfd``."""
    links: dict[tuple[int, int], str] = {}
    _mirror(
        sfd,
        dfd,
        # a directory is done: its attributes last (its mtime, a read-only mode)
        lambda s, d: _copy_meta_fd(s, d, os.fstat(s)),
        lambda s, d, rel, name, st: _copy_entry(s, d, dfd, rel, name, st, links),
    )


def _mirror(
    sfd: int,
    dfd: int,
    done: Callable[[int, int], None],
    entry: Callable[[int, int, str, str, os.stat_result], None],
) -> None:
    """Walk the tree below ``sfd`` (any depth, no recursion), making each directory again below
    ``dfd``; ``entry(src_dir, dst_dir, rel, name, st)`` handles what is not a directory and
    ``done(src_dir, dst_dir)`` each directory once its contents are there."""
    walk = TreeWalk(sfd)
    out = DirChain(dfd)
    try:
        for name, st in walk:
            if st is None:
                done(walk.fd, out.fd)
                out.pop()
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(name, 0o700, dir_fd=out.fd)
                walk.enter(name)
                out.push(name)
            else:
                entry(walk.fd, out.fd, walk.rel, name, st)
    finally:
        walk.close()
        out.close()


def _copy_entry(
    sfd: int, dfd: int, root: int, rel: str, name: str, st: os.stat_result, links: dict[tuple[int, int], str]
) -> None:
    """Copy the entry ``name`` (not a directory) of ``sfd`` into ``dfd``, at ``rel`` below the
    copy's root fd ``root``."""
    mode = st.st_mode
    if st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
        # The first copy's path runs through directories this copy made itself: no links.
        with contextlib.suppress(OSError):
            os.link(links[(st.st_dev, st.st_ino)], name, src_dir_fd=root, dst_dir_fd=dfd, follow_symlinks=False)
            return
    if stat.S_ISREG(mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                return
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                copy_data(fd, out, fst.st_size)
                _copy_meta_fd(fd, out, fst)
            finally:
                os.close(out)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        with contextlib.suppress(PermissionError):
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
    elif stat.S_ISCHR(mode) and st.st_rdev == 0:  # an overlay whiteout
        os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dfd)
        with contextlib.suppress(PermissionError):
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(name, stat.S_IMODE(mode), dir_fd=dfd)
        with contextlib.suppress(PermissionError):
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
    else:
        return
    if st.st_nlink > 1:
        links[(st.st_dev, st.st_ino)] = rel + name


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE) == b"y"
    except OSError:
        return False


def _dir_meta(sfd: int, dfd: int) -> None:
    """A layer directory's attributes onto a squashed one; its opaque mark stays as it was."""
    st = os.fstat(sfd)
    with contextlib.suppress(PermissionError):
        os.fchown(dfd, st.st_uid, st.st_gid)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        for name in os.listxattr(sfd):
            if name not in _SKIP_XATTRS and name != OPAQUE:
                os.setxattr(dfd, name, os.getxattr(sfd, name))
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _set_opaque(pfd: int, name: str) -> None:
    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        os.setxattr(fd, OPAQUE, b"y")
    finally:
        os.close(fd)


def _link_tree(sfd: int, dfd: int) -> None:
    """``cp -al`` for layers, from the directory ``sfd`` into the new directory ``dfd``:
    directories are made, everything else hard-linked (layers are immutable, so sharing inodes
    between them is safe and costs no data copy). Any depth: the walk does not recurse."""

    def done(s: int, d: int) -> None:
        _dir_meta(s, d)
        if _is_opaque(s):
            os.setxattr(d, OPAQUE, b"y")

    _mirror(
        sfd,
        dfd,
        done,
        lambda s, d, _rel, name, _st: os.link(name, name, src_dir_fd=s, dst_dir_fd=d, follow_symlinks=False),
    )
    done(sfd, dfd)


def _place(sfd: int, dfd: int, name: str, st: os.stat_result, below: os.stat_result | None) -> None:
    """Put the layer entry ``name`` of ``sfd`` into the squashed directory ``dfd`` in place of
    what is there (``below``, its lstat, or None)."""
    if below is not None:
        if stat.S_ISDIR(below.st_mode):
            rmtree_at(dfd, name)
        else:
            os.unlink(name, dir_fd=dfd)
    if not stat.S_ISDIR(st.st_mode):
        os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        return
    os.mkdir(name, 0o700, dir_fd=dfd)
    csfd = os.open(name, _DIR_FLAGS, dir_fd=sfd)
    try:
        cdfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            _link_tree(csfd, cdfd)
            # A directory landing where the lower result had a file or whiteout must hide what
            # is further below, exactly as the whiteout did: mark it opaque.
            if below is not None:
                os.setxattr(cdfd, OPAQUE, b"y")
        finally:
            os.close(cdfd)
    finally:
        os.close(csfd)


def merge_into(result: Path, layer: Path) -> None:
    """Apply ``layer`` on top of ``result`` so that ``result`` alone equals the two stacked."""
    rfd = os.open(result, _DIR_FLAGS)
    lfd = os.open(layer, _DIR_FLAGS)
    walk = TreeWalk(lfd)
    out = DirChain(rfd)
    try:
        for name, st in walk:
            if st is None:  # a directory merged into one below: its attributes, the lower one's opaque mark
                _dir_meta(walk.fd, out.fd)
                out.pop()
                continue
            try:
                below: os.stat_result | None = os.stat(name, dir_fd=out.fd, follow_symlinks=False)
            except FileNotFoundError:
                below = None
            if stat.S_ISDIR(st.st_mode) and below is not None and stat.S_ISDIR(below.st_mode):
                walk.enter(name)
                if not _is_opaque(walk.fd):
                    out.push(name)
                    continue
                walk.up()
            _place(walk.fd, out.fd, name, st, below)
    finally:
        walk.close()
        out.close()
        os.close(lfd)
        os.close(rfd)


def squash(layers: list[Path], dest: Path) -> None:
    """Merge a stack of layers (lowest first) into one new layer at ``dest``."""
    dest.mkdir()
    for layer in layers:
        merge_into(dest, layer)
