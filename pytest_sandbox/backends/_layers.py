"""Operations on overlayfs layer trees: copying a writable layer out, and squashing a stack.

A layer is a directory in overlayfs upper-layer format: a deleted path is a 0/0 character device
(a whiteout), and a directory that hides everything below it carries the ``user.overlay.opaque``
xattr (bwrap always mounts with ``userxattr``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

from ..errors import SandboxError

OPAQUE = "user.overlay.opaque"
_SKIP_XATTRS = ("user.overlay.origin", "user.overlay.impure", "user.overlay.nlink")


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a layer tree with modes, owners, xattrs and whiteouts (``cp -a``, reflinks if cheap)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", f"{dest}/"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SandboxError(f"copying layer {src} failed: {proc.stderr.strip()}")


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
        from ..store import rmtree

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
