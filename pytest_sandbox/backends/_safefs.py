"""File access inside a running sandbox from the host, that no sandbox path can lead out of.

Every path is resolved with ``openat2(RESOLVE_IN_ROOT)`` against a directory fd of the sandbox's
root (``/proc/<pid>/root``): the kernel treats that fd as ``/`` for the whole lookup, so ``..``,
absolute symlinks and symlinks to ``/etc/passwd`` all stay inside the sandbox. Final components
that are created or removed are handled with ``*at`` calls on an already-resolved parent fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
from pathlib import Path

from ..errors import ConfigError, SandboxError, SandboxFileError

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


def _norm(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"sandbox paths are absolute, like '/work/file.txt'; got {path!r}")
    if "\0" in path:
        raise ConfigError(f"sandbox path {path!r} contains a NUL byte")
    return posixpath.normpath(path).replace("//", "/")


class SafeFS:
    """:class:`pytest_sandbox.api.SandboxFS` over a sandbox root directory fd."""

    def __init__(self, root_fd_opener: object) -> None:
        # A callable returning a fresh O_PATH fd of the sandbox root (the sandbox may be gone).
        self._opener = root_fd_opener

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
    def read(self, path: str) -> bytes:
        """The contents of a file."""
        path = _norm(path)
        try:
            fd = self._open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._fail(exc, "read", path) from exc
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise SandboxFileError(errno.EISDIR, f"read {path}: is a directory")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_text(self, path: str) -> str:
        """The contents of a file as UTF-8 text."""
        return self.read(path).decode("utf-8", errors="replace")

    def exists(self, path: str) -> bool:
        """True when the path exists (following symlinks inside the sandbox)."""
        try:
            os.close(self._open(_norm(path), os.O_PATH))
        except OSError:
            return False
        return True

    def stat(self, path: str, follow_symlinks: bool = True) -> os.stat_result:
        """The file's status (symlinks followed inside the sandbox unless ``follow_symlinks=False``)."""
        path = _norm(path)
        try:
            fd = self._open(path, os.O_PATH | (0 if follow_symlinks else os.O_NOFOLLOW))
        except OSError as exc:
            raise self._fail(exc, "stat", path) from exc
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

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
            fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        except OSError as exc:
            raise self._fail(exc, "write", path) from exc
        try:
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
                    _rmtree_at(pfd, name)
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

    def download(self, path: str, local: str | os.PathLike[str]) -> None:
        """Copy a sandbox file or directory tree to the host path ``local``.

        Symlinks are recreated as symlinks, never followed, so a link to a host path cannot make
        the download read or write that host file.
        """
        path = _norm(path)
        dest = Path(local)
        try:
            fd = self._open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._fail(exc, "download", path) from exc
        try:
            _copy_out(fd, dest)
        finally:
            os.close(fd)


def _copy_out(fd: int, dest: Path) -> None:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(fd)):
            cst = os.stat(name, dir_fd=fd, follow_symlinks=False)
            target = dest / name
            if stat.S_ISLNK(cst.st_mode):
                if os.path.lexists(target):
                    target.unlink()
                os.symlink(os.readlink(name, dir_fd=fd), target)
            elif stat.S_ISDIR(cst.st_mode) or stat.S_ISREG(cst.st_mode):
                cfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    _copy_out(cfd, target)
                finally:
                    os.close(cfd)
        os.chmod(dest, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink():
            dest.unlink()  # never write through a host symlink that happens to sit there
        out = os.open(
            dest,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(st.st_mode),
        )
        try:
            while chunk := os.read(fd, 1 << 20):
                os.write(out, chunk)
        finally:
            os.close(out)


def _rmtree_at(pfd: int, name: str) -> None:
    dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        for child in os.listdir(dfd):
            st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _rmtree_at(dfd, child)
            else:
                os.unlink(child, dir_fd=dfd)
    finally:
        os.close(dfd)
    os.rmdir(name, dir_fd=pfd)
