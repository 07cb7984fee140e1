"""Operations on overlayfs layer trees: copying a writable layer out, and squashing a stack.

A layer is a directory in overlayfs upper-layer format: a deleted path is a 0/0 character device
(a whiteout), and a directory that hides everything below it carries the ``user.overlay.opaque``
xattr (bwrap always mounts with ``userxattr``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from ..errors import SandboxError
from ..store import rmtree

OPAQUE = "user.overlay.opaque"
_SKIP_XATTRS = ("user.overlay.origin", "user.overlay.impure", "user.overlay.nlink")


def copy_tree(src: Path, dest: Path, top_only: bool = False) -> None:
    """Copy a writable layer out with modes, owners, xattrs, hard links and whiteouts.

    ``src`` is written by sandbox code, so nothing in it is trusted: every entry is opened
    relative to its parent's fd with ``O_NOFOLLOW`` (a symlink is copied as a link, never
    followed on the host), only regular files are read, and a directory swapped for a link
    mid-walk is refused rather than entered. Device nodes other than whiteouts, and sockets, are
    left out (a sandbox cannot make the first, and the second mean nothing in a snapshot).
    ``top_only`` copies only the attributes of ``src`` itself onto ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not top_only:
            _copy_dir(sfd, dfd, dfd, "", {})
        _copy_meta_fd(sfd, dfd, os.fstat(sfd))
    except OSError as exc:
        raise SandboxError(f"copying layer {src} failed: {exc}") from exc
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


def _copy_dir(sfd: int, dfd: int, root: int, rel: str, links: dict[tuple[int, int], str]) -> None:
    """Copy the directory ``sfd`` into ``dfd`` (at ``rel`` below the copy's root fd ``root``)."""
    for name in os.listdir(sfd):
        try:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dfd)
            csfd = os.open(name, _DIR_FLAGS, dir_fd=sfd)
            cdfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                _copy_dir(csfd, cdfd, root, f"{rel}{name}/", links)
                _copy_meta_fd(csfd, cdfd, os.fstat(csfd))
            finally:
                os.close(csfd)
                os.close(cdfd)
            continue
        if st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
            # The first copy's path runs through directories this copy made itself: no links.
            with contextlib.suppress(OSError):
                os.link(links[(st.st_dev, st.st_ino)], name, src_dir_fd=root, dst_dir_fd=dfd, follow_symlinks=False)
                continue
        if stat.S_ISREG(mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    continue
                out = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
                )
                try:
                    _copy_data(fd, out, fst.st_size)
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
            continue
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = rel + name


def _copy_data(src: int, dst: int, size: int) -> None:
    """copy_file_range (a reflink where the filesystem shares extents), else read and write."""
    try:
        while os.copy_file_range(src, dst, 1 << 30):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while chunk := os.read(src, 1 << 20):
        os.write(dst, chunk)


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _copy_meta(src: Path, dest: Path, st: os.stat_result) -> None:
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(PermissionError):
        os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    with contextlib.suppress(OSError):
        for name in os.listxattr(src, follow_symlinks=False):
            if name not in _SKIP_XATTRS and name != OPAQUE:
                os.setxattr(dest, name, os.getxattr(src, name, follow_symlinks=False))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        rmtree(path)
    else:
        path.unlink()


def _link_tree(src: Path, dest: Path) -> None:
    """``cp -al`` for layers: directories are made, everything else hard-linked (layers are
    immutable, so sharing inodes between them is safe and costs no data copy)."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        dest.mkdir()
        for name in os.listdir(src):
            _link_tree(src / name, dest / name)
        _copy_meta(src, dest, st)
        if _is_opaque(src):
            os.setxattr(dest, OPAQUE, b"y")
    else:
        os.link(src, dest, follow_symlinks=False)


def merge_into(result: Path, layer: Path) -> None:
    """Apply ``layer`` on top of ``result`` so that ``result`` alone equals the two stacked."""
    for name in os.listdir(layer):
        src, dest = layer / name, result / name
        st = os.lstat(src)
        try:
            dst_st: os.stat_result | None = os.lstat(dest)
        except FileNotFoundError:
            dst_st = None
        if stat.S_ISDIR(st.st_mode) and not _is_opaque(src) and dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
            merge_into(dest, src)
            was_opaque = _is_opaque(dest)
            _copy_meta(src, dest, st)
            if was_opaque:
                os.setxattr(dest, OPAQUE, b"y")
            continue
        # A directory landing where the lower result had a file or whiteout must hide what is
        # further below, exactly as the whiteout did: mark it opaque.
        hides_lower = stat.S_ISDIR(st.st_mode) and dst_st is not None
        if dst_st is not None:
            _remove(dest)
        _link_tree(src, dest)
        if hides_lower:
            os.setxattr(dest, OPAQUE, b"y")


def squash(layers: list[Path], dest: Path) -> None:
    """Merge a stack of layers (lowest first) into one new layer at ``dest``."""
    dest.mkdir()
    for layer in layers:
        merge_into(dest, layer)
