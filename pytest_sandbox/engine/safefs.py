"""File access inside a running sandbox from the host, that no sandbox path can lead out of.

Every path is resolved with ``openat2(RESOLVE_IN_ROOT)`` against a directory fd of the sandbox's
root (``/proc/<pid>/root``): the kernel treats that fd as ``/`` for the whole lookup, so ``..``,
absolute symlinks and symlinks to ``/etc/passwd`` all stay inside the sandbox. Final components
that are created or removed are handled with ``*at`` calls on an already-resolved parent fd.

What is read is first opened with ``O_PATH`` (no side effect, even on a device or a FIFO) and
only reopened for reading when it is a regular file, and reads stop at a size limit: a sandbox
cannot make the runner block, fill its memory or fill its disk through ``fs``. Downloads create
every host entry below an already-open directory with ``O_NOFOLLOW``, so a symlink a sandbox
put on the host side is replaced, never written through, and they drop setuid and setgid bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import stat
from collections.abc import Callable
from pathlib import Path

from .._hostfs import HostTree, TreeWalk, rmtree_at
from ..errors import ConfigError, SandboxError, SandboxFileError
from ..types import DEFAULT_MAX_DOWNLOAD, DEFAULT_MAX_READ, FileInfo
from .ids import acting_as

__all__ = ["SafeFS", "openat2"]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added after the table unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(2) with RESOLVE_IN_ROOT: ``path`` is looked up as if ``dirfd`` were ``/``."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise SandboxError("this kernel has no openat2 (Linux 5.6+ is needed for sandbox files)")
        raise OSError(err, os.strerror(err), path)
    return int(fd)


# Kernel interfaces mounted inside a sandbox (or reachable through its symlinks): what a file there
# says, or does when written, depends on who opens it, and the runner may be host root. Their
# contents are the sandbox's to read with its own commands, never the runner's on its behalf.
_KERNEL_FS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1CD1: "devpts",
    0x73636673: "securityfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x19800202: "mqueue",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
    0xF97CFF8C: "selinuxfs",
    0x6E736673: "nsfs",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
}


def _kernel_fs(fd: int) -> str | None:
    """The name of the kernel interface ``fd`` is on, or None for an ordinary filesystem."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return _KERNEL_FS.get(ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF)


def _norm(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"sandbox paths are absolute, like '/work/file.txt'; got {path!r}")
    if "\0" in path:
        raise ConfigError(f"sandbox path {path!r} contains a NUL byte")
    return posixpath.normpath(path).replace("//", "/")


class SafeFS:
    """:class:`pytest_sandbox.api.SandboxFS` over a sandbox root directory fd."""

    def __init__(self, root_fd_opener: object, owner: tuple[int, int] | None = None) -> None:
        # A callable returning a fresh O_PATH fd of the sandbox root (the sandbox may be gone).
        self._opener = root_fd_opener
        # Host uid/gid of root inside, when it is not us: what we create is created as it.
        self._owner = owner

    def _creating(self) -> contextlib.AbstractContextManager[None]:
        return acting_as(self._owner)

    def _root(self) -> int:
        fd = self._opener()  # type: ignore[operator]
        assert isinstance(fd, int)
        return fd

    def _fail(self, exc: OSError, op: str, path: str) -> SandboxFileError:
        what = {
            errno.ENOENT: "no such file or directory",
            errno.ENOTDIR: "not a directory",
            errno.EISDIR: "is a directory",
            errno.EEXIST: "already exists",
            errno.ENOTEMPTY: "directory not empty (pass recursive=True)",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        err = SandboxFileError(exc.errno or 0, f"{op} {path}: {what}")
        err.__cause__ = exc
        return err

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        root = self._root()
        try:
            return openat2(root, path, flags, mode)
        finally:
            os.close(root)

    def _parent(self, path: str) -> tuple[int, str]:
        parent, name = posixpath.split(path)
        if not name:
            raise ConfigError("this operation needs a path below '/', not '/' itself")
        return self._open(parent, os.O_PATH | os.O_DIRECTORY), name

    # -- reading ----------------------------------------------------------------------------
    def _refuse_kernel_file(self, fd: int, op: str, path: str) -> None:
        kind = _kernel_fs(fd)
        if kind is not None:
            raise SandboxFileError(
                errno.EPERM,
                f"{op} {path}: is on the kernel's {kind} filesystem, which the runner does not {op} for a"
                " sandbox (it may be host root); run a command inside instead, e.g. sb.exec('cat PATH')",
            )

    def readable_inside(self, st: os.stat_result) -> bool:
        """Whether root inside the sandbox may read (a directory: list) the file of ``st``. The
        runner reads on the sandbox's behalf and, as host root, could read what the sandbox cannot
        (the host base's /etc/shadow through a symlink): what the sandbox cannot, it does not."""
        if self._owner is None:  # rootless: the runner's ids are the sandbox root's
            return True
        uid, gid = (self._inside(st.st_uid, 0), self._inside(st.st_gid, 1))
        if uid != 65534 and gid != 65534:  # both mapped: root inside has its capabilities over it
            return True
        want = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        return st.st_mode & want == want

    def _open_regular(self, path: str, op: str, allow_dir: bool = False) -> int:
        """An fd to read ``path`` with, refusing FIFOs, devices and sockets without opening them,
        kernel files, and what root inside the sandbox could not read itself."""
        try:
            pfd = self._open(path, os.O_PATH)
        except OSError as exc:
            raise self._fail(exc, op, path) from exc
        try:
            self._refuse_kernel_file(pfd, op, path)
            st = os.fstat(pfd)
            if not self.readable_inside(st):
                raise SandboxFileError(errno.EACCES, f"{op} {path}: root inside the sandbox may not read it")
            mode = st.st_mode
            if stat.S_ISDIR(mode) and allow_dir:
                return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if stat.S_ISDIR(mode):
                raise SandboxFileError(errno.EISDIR, f"{op} {path}: is a directory")
            if not stat.S_ISREG(mode):
                kind = _kind(mode)
                raise SandboxFileError(
                    errno.EINVAL, f"{op} {path}: is a {kind}, not a regular file; refusing to read it"
                )
            return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if isinstance(exc, SandboxFileError):
                raise
            raise self._fail(exc, op, path) from exc
        finally:
            os.close(pfd)

    def read(self, path: str, max_size: int = DEFAULT_MAX_READ) -> bytes:
        """The contents of a regular file, at most ``max_size`` bytes (else :class:`SandboxFileError`)."""
        path = _norm(path)
        fd = self._open_regular(path, "read")
        try:
            chunks, total = [], 0
            while chunk := os.read(fd, min(1 << 20, max_size + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_size:
                    raise SandboxFileError(
                        errno.EFBIG, f"read {path}: larger than max_size={max_size} bytes; pass a larger max_size"
                    )
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_text(self, path: str, max_size: int = DEFAULT_MAX_READ) -> str:
        """The contents of a file as UTF-8 text."""
        return self.read(path, max_size=max_size).decode("utf-8", errors="replace")

    def exists(self, path: str) -> bool:
        """True when the path exists (following symlinks inside the sandbox)."""
        try:
            os.close(self._open(_norm(path), os.O_PATH))
        except OSError:
            return False
        return True

    def stat(self, path: str, follow_symlinks: bool = True) -> FileInfo:
        """The file's status (symlinks followed inside the sandbox unless ``follow_symlinks=False``),
        with owners as the sandbox sees them (65534, ``nobody``, for ids it does not map)."""
        path = _norm(path)
        try:
            fd = self._open(path, os.O_PATH | (0 if follow_symlinks else os.O_NOFOLLOW))
        except OSError as exc:
            raise self._fail(exc, "stat", path) from exc
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return FileInfo(st.st_mode, st.st_size, st.st_mtime, self._inside(st.st_uid, 0), self._inside(st.st_gid, 1))

    def _inside(self, host_id: int, which: int) -> int:
        if self._owner is None:  # rootless: only the caller is mapped, as root
            return 0 if host_id == (os.geteuid(), os.getegid())[which] else 65534
        n = host_id - self._owner[which]
        return n if 0 <= n < 65536 else 65534

    def is_dir(self, path: str) -> bool:
        """True when the path is a directory."""
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except SandboxFileError:
            return False

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted."""
        path = _norm(path)
        try:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise self._fail(exc, "listdir", path) from exc
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    # -- writing ----------------------------------------------------------------------------
    def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        """Create a directory (and its parents unless ``parents=False``); existing ones are fine."""
        path = _norm(path)
        parts = [p for p in path.split("/") if p]
        todo = range(len(parts)) if parents else [len(parts) - 1]
        for i in todo:
            sub = "/" + "/".join(parts[: i + 1])
            if self.is_dir(sub):
                continue
            try:
                pfd, name = self._parent(sub)
            except OSError as exc:
                raise self._fail(exc, "mkdir", path) from exc
            try:
                with self._creating():
                    os.mkdir(name, mode, dir_fd=pfd)
            except FileExistsError as exc:
                if not self.is_dir(sub):
                    raise self._fail(exc, "mkdir", sub) from exc
            except OSError as exc:
                raise self._fail(exc, "mkdir", sub) from exc
            finally:
                os.close(pfd)

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file, creating its parent directories; an existing file is replaced."""
        path = _norm(path)
        if isinstance(data, str):
            data = data.encode()
        self.mkdir(posixpath.dirname(path))
        try:
            # O_NONBLOCK: a FIFO put there fails (ENXIO) instead of blocking us.
            with self._creating():
                fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, mode)
        except OSError as exc:
            raise self._fail(exc, "write", path) from exc
        try:
            self._refuse_kernel_file(fd, "write", path)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxFileError(errno.EINVAL, f"write {path}: not a regular file; refusing to write it")
            os.ftruncate(fd, 0)
            os.set_blocking(fd, True)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, a symlink, an empty directory, or with ``recursive=True`` a whole tree."""
        path = _norm(path)
        try:
            pfd, name = self._parent(path)
        except OSError as exc:
            raise self._fail(exc, "remove", path) from exc
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    rmtree_at(pfd, name)
                else:
                    os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError as exc:
            raise self._fail(exc, "remove", path) from exc
        finally:
            os.close(pfd)

    # -- trees ------------------------------------------------------------------------------
    def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """Copy a host file or directory tree to ``path`` in the sandbox (modes and symlinks kept)."""
        src = Path(local)
        path = _norm(path)
        st = src.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.mkdir(posixpath.dirname(path))
            pfd, name = self._parent(path)
            try:
                if os.path.lexists(f"/proc/self/fd/{pfd}/{name}"):
                    os.unlink(name, dir_fd=pfd)
                with self._creating():
                    os.symlink(os.readlink(src), name, dir_fd=pfd)
            finally:
                os.close(pfd)
        elif stat.S_ISDIR(st.st_mode):
            self.mkdir(path, mode=stat.S_IMODE(st.st_mode))
            for child in sorted(os.listdir(src)):
                self.upload(src / child, posixpath.join(path, child))
        elif stat.S_ISREG(st.st_mode):
            self.write(path, src.read_bytes(), stat.S_IMODE(st.st_mode))
        else:
            raise ConfigError(f"cannot upload {src}: only files, directories and symlinks")

    def download(self, path: str, local: str | os.PathLike[str], max_size: int = DEFAULT_MAX_DOWNLOAD) -> None:
        """Copy a sandbox file or directory tree to the host path ``local``.

        Symlinks are recreated as symlinks, never followed; an existing host entry in the way
        (a link a sandbox put there on an earlier download included) is replaced, never written
        through. FIFOs, devices and sockets are refused (skipped inside a tree), and so are kernel
        filesystems (/proc, /sys) and what root inside the sandbox may not read; setuid and setgid
        bits are dropped. Past ``max_size`` bytes in all (4 KiB counted per entry) the download
        stops with :class:`SandboxFileError`.
        """
        path = _norm(path)
        dest = Path(local)
        fd = self._open_regular(path, "download", allow_dir=True)
        try:
            tree = HostTree(dest, max_size, path)
            try:
                _copy_out(fd, tree, self.readable_inside)
            finally:
                tree.close()
        except OSError as exc:
            if isinstance(exc, SandboxFileError):
                raise
            raise self._fail(exc, "download", path) from exc
        finally:
            os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _copy_out(fd: int, tree: HostTree, readable: Callable[[os.stat_result], bool]) -> None:
    """Copy the open sandbox entry ``fd`` to ``tree``, without recursion (a sandbox's tree may be
    thousands of levels deep). The sandbox side is walked by fds with ``O_NOFOLLOW``, so an entry
    swapped for a link meanwhile is skipped, and so are kernel filesystems (/proc, /sys below a
    tree) and what root inside could not read."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        with open(fd, "rb", closefd=False) as data:
            tree.file((), st.st_mode, data)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxFileError(errno.EINVAL, f"download {tree.path}: is a {_kind(st.st_mode)}; refusing to copy it")
    tree.directory((), st.st_mode)
    walk = TreeWalk(fd)
    try:
        for name, cst in walk:
            if cst is None:
                continue
            parts = (*walk.rel.split("/")[:-1], name)
            if stat.S_ISLNK(cst.st_mode):
                tree.symlink(parts, os.readlink(name, dir_fd=walk.fd))
            elif not readable(cst):
                continue
            elif stat.S_ISDIR(cst.st_mode):
                try:
                    walk.enter(name)
                except OSError as exc:
                    if exc.errno in _SWAPPED_OR_DENIED:
                        continue
                    raise
                dst = os.fstat(walk.fd)
                if _kernel_fs(walk.fd) is not None or not readable(dst):
                    walk.up()
                    continue
                tree.directory(parts, dst.st_mode)
            elif stat.S_ISREG(cst.st_mode):
                try:
                    cfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=walk.fd)
                except OSError as exc:
                    if exc.errno in _SWAPPED_OR_DENIED:
                        continue
                    raise
                try:
                    fst = os.fstat(cfd)
                    if stat.S_ISREG(fst.st_mode) and readable(fst) and _kernel_fs(cfd) is None:
                        with open(cfd, "rb", closefd=False) as data:
                            tree.file(parts, fst.st_mode, data)
                finally:
                    os.close(cfd)
    finally:
        walk.close()


# Opening an entry of a tree failed because it was swapped for something else meanwhile, or is not
# the sandbox's to read either (its overlay checks as the sandbox): the entry is left out.
_SWAPPED_OR_DENIED = (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EACCES)
