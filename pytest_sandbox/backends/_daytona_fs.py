"""The Daytona backend's :class:`~pytest_sandbox.types.SandboxFS`: Daytona's file API (which
resolves every path inside the sandbox), with ``tar`` in the sandbox for whole trees."""

from __future__ import annotations

import errno
import io
import os
import posixpath
import shlex
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError, SandboxFileError
from ..store import new_id
from ..types import DEFAULT_MAX_DOWNLOAD, DEFAULT_MAX_READ, ExecResult, FileInfo
from ._base import STAT_SH, extract_tar, file_error, sandbox_path, stat_info

__all__ = ["DaytonaFS"]

_T = TypeVar("_T")


class _Remote(Protocol):
    """What the file API needs of a Daytona sandbox."""

    sdk: Any  # the SDK's Sandbox

    @property
    def sdk_error(self) -> type[Exception]: ...
    def _check_open(self) -> None: ...
    def call(self, what: str, fn: Callable[..., _T], *args: Any, passthrough: tuple[type[Exception], ...]) -> _T: ...
    def _run(self, argv: Sequence[str]) -> ExecResult: ...


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Uploaded files belong to root in the sandbox, as on the other backends; the host's ids may not
    # even exist there (a rootless sandbox maps only root).
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class DaytonaFS:
    """:class:`pytest_sandbox.api.SandboxFS` through Daytona's file API (which works inside the
    sandbox, so every path resolves there), with ``tar`` in the sandbox for whole trees."""

    def __init__(self, sb: _Remote) -> None:
        self._sb = sb

    def _call(self, op: str, path: str, fn: Callable[..., _T], *args: Any) -> _T:
        self._sb._check_open()
        try:
            return self._sb.call(f"{op} {path}", fn, *args, passthrough=(self._sb.sdk_error,))
        except self._sb.sdk_error as exc:
            raise file_error(str(exc), op, path) from exc

    def read(self, path: str, max_size: int = DEFAULT_MAX_READ) -> bytes:
        """The contents of a regular file, at most ``max_size`` bytes (symlinks followed inside)."""
        path = sandbox_path(path)
        info = self._info(path)
        if info is not None and getattr(info, "is_dir", False):
            raise SandboxFileError(errno.EISDIR, f"read {path}: is a directory")
        if info is not None and int(getattr(info, "size", 0) or 0) > max_size:
            raise SandboxFileError(errno.EFBIG, f"read {path}: larger than max_size={max_size}; pass a larger one")
        data = bytes(self._call("read", path, self._sb.sdk.fs.download_file, path) or b"")
        if len(data) > max_size:  # grew after the check
            raise SandboxFileError(errno.EFBIG, f"read {path}: larger than max_size={max_size}; pass a larger one")
        return data

    def read_text(self, path: str, max_size: int = DEFAULT_MAX_READ) -> str:
        """The contents of a file as UTF-8 text."""
        return self.read(path, max_size).decode("utf-8", errors="replace")

    def _info(self, path: str) -> Any | None:
        try:
            return self._call("stat", path, self._sb.sdk.fs.get_file_info, path)
        except SandboxFileError:
            return None

    def exists(self, path: str) -> bool:
        """True when the path exists (following symlinks inside the sandbox)."""
        return self._info(sandbox_path(path)) is not None

    def is_dir(self, path: str) -> bool:
        """True when the path is a directory."""
        info = self._info(sandbox_path(path))
        return bool(info is not None and info.is_dir)

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted."""
        path = sandbox_path(path)
        return sorted(f.name for f in self._call("listdir", path, self._sb.sdk.fs.list_files, path))

    def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        """Create a directory (and its parents unless ``parents=False``); existing ones are fine."""
        path = sandbox_path(path)
        if not parents and not self.is_dir(posixpath.dirname(path)):
            raise SandboxFileError(errno.ENOENT, f"mkdir {path}: no such file or directory")
        self._call("mkdir", path, self._sb.sdk.fs.create_folder, path, f"{mode:o}")

    def stat(self, path: str, follow_symlinks: bool = True) -> FileInfo:
        """The file's status (symlinks followed inside the sandbox unless ``follow_symlinks=False``)."""
        path = sandbox_path(path)
        cmd = shlex.join(["/bin/sh", "-c", STAT_SH, "sh", path, "1" if follow_symlinks else "0"])
        res = self._call("stat", path, self._sb.sdk.process.exec, cmd)
        if int(res.exit_code or 0) != 0:
            raise file_error(str(res.result or ""), "stat", path)
        return stat_info(str(res.result or ""), path)

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file, creating its parent directories; a symlink is written through, inside."""
        path = sandbox_path(path)
        if isinstance(data, str):
            data = data.encode()
        self._call("write", path, self._sb.sdk.fs.upload_file, data, path)
        if mode != 0o644:
            self._call("chmod", path, self._sb.sdk.fs.set_file_permissions, path, f"{mode:o}")

    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, a symlink, an empty directory, or with ``recursive=True`` a whole tree."""
        path = sandbox_path(path)
        self._call("remove", path, self._sb.sdk.fs.delete_file, path, recursive)

    def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """Copy a host file or directory tree to ``path`` in the sandbox (modes and symlinks kept)."""
        path = sandbox_path(path)
        src = Path(local)
        if not os.path.lexists(src):
            raise ConfigError(f"cannot upload {src}: it does not exist")
        if src.is_file() and not src.is_symlink():
            self.write(path, src.read_bytes(), mode=src.stat().st_mode & 0o7777)
            return
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(str(src), arcname=posixpath.basename(path), recursive=True, filter=_as_root)
        tmp = f"/tmp/.psb-{new_id(6)}.tar"
        self.write(tmp, buf.getvalue())
        parent = posixpath.dirname(path)
        self._sb._run(
            ["/bin/sh", "-c", 'mkdir -p -- "$1" && tar -xf "$2" -C "$1"; r=$?; rm -f "$2"; exit $r', "sh", parent, tmp]
        ).check()

    def download(self, path: str, local: str | os.PathLike[str], max_size: int = DEFAULT_MAX_DOWNLOAD) -> None:
        """Copy a sandbox file or tree to the host path ``local`` (the local engine's rules:
        links recreated, never followed, no setuid bits, special files skipped, ``max_size``)."""
        path = sandbox_path(path)
        tmp = f"/tmp/.psb-{new_id(6)}.tar"
        res = self._sb._run(
            [
                "/bin/sh",
                "-c",
                'tar -cf "$3" -C "$1" -- "$2"',
                "sh",
                posixpath.dirname(path) or "/",
                posixpath.basename(path) or ".",
                tmp,
            ]
        )
        if not res.ok:
            self.remove(tmp) if self.exists(tmp) else None
            raise SandboxFileError(errno.ENOENT, f"download {path}: no such file or directory")
        try:
            data = self.read(tmp, max_size + (1 << 20))
        finally:
            self.remove(tmp)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            extract_tar(tf, Path(local), max_size, path)
