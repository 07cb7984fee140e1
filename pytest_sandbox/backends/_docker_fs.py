"""The docker backend's :class:`~pytest_sandbox.types.SandboxFS`: Docker's archive API (which
resolves every path inside the container's root) and small shell commands in the container."""

from __future__ import annotations

import errno
import io
import os
import posixpath
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, SandboxFileError
from ..types import DEFAULT_MAX_DOWNLOAD, DEFAULT_MAX_READ, FileInfo
from ._base import STAT_SH, extract_tar, file_error, sandbox_path, stat_info

__all__ = ["DockerFS", "tar_file"]


class _Container(Protocol):
    """What the file API needs of a docker sandbox."""

    container: Any  # docker-py's Container
    backend: Any

    def _check_open(self) -> None: ...
    def _exec_raw(self, argv: Sequence[str], env: Any = None) -> tuple[int, bytes, bytes]: ...


def tar_file(name: str, data: bytes, mode: int) -> bytes:
    """A one-file tar archive (what Docker's put_archive takes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class DockerFS:
    """:class:`pytest_sandbox.api.SandboxFS` through Docker's archive API (which resolves every path
    inside the container's root) and small shell commands in the container."""

    def __init__(self, sb: _Container) -> None:
        self._sb = sb

    def _sh(self, script: str, *args: str, op: str, path: str) -> bytes:
        self._sb._check_open()
        code, out, err = self._sb._exec_raw(["/bin/sh", "-c", script, "sh", *args])
        if code != 0:
            raise file_error(err.decode(errors="replace"), op, path)
        return out

    def _archive(self, path: str, op: str, max_size: int) -> tarfile.TarFile:
        self._sb._check_open()
        errors = self._sb.backend._errors
        try:
            stream, _ = self._sb.container.get_archive(path)
        except errors.NotFound as exc:
            raise SandboxFileError(errno.ENOENT, f"{op} {path}: no such file or directory") from exc
        chunks, total = [], 0
        for chunk in stream:  # bounded: a container's file must not fill the runner's memory
            total += len(chunk)
            if total > max_size + (1 << 20):
                raise SandboxFileError(errno.EFBIG, f"{op} {path}: larger than max_size={max_size}; pass a larger one")
            chunks.append(chunk)
        return tarfile.open(fileobj=io.BytesIO(b"".join(chunks)))

    def read(self, path: str, max_size: int = DEFAULT_MAX_READ) -> bytes:
        """The contents of a regular file, at most ``max_size`` bytes (symlinks followed inside)."""
        path = sandbox_path(path)
        for _ in range(40):
            with self._archive(path, "read", max_size) as tf:
                member = tf.next()
                assert member is not None
                if member.issym():
                    path = sandbox_path(posixpath.join(posixpath.dirname(path), member.linkname))
                    continue
                if member.isdir():
                    raise SandboxFileError(errno.EISDIR, f"read {path}: is a directory")
                if not member.isfile():
                    raise SandboxFileError(errno.EINVAL, f"read {path}: not a regular file; refusing to read it")
                if member.size > max_size:
                    raise SandboxFileError(errno.EFBIG, f"read {path}: larger than max_size={max_size}")
                f = tf.extractfile(member)
                return f.read() if f is not None else b""
        raise SandboxFileError(errno.ELOOP, f"read {path}: too many levels of symbolic links")

    def read_text(self, path: str, max_size: int = DEFAULT_MAX_READ) -> str:
        """The contents of a file as UTF-8 text."""
        return self.read(path, max_size).decode("utf-8", errors="replace")

    def exists(self, path: str) -> bool:
        """True when the path exists (following symlinks inside the container)."""
        return self._sb._exec_raw(["test", "-e", sandbox_path(path)])[0] == 0

    def is_dir(self, path: str) -> bool:
        """True when the path is a directory."""
        return self._sb._exec_raw(["test", "-d", sandbox_path(path)])[0] == 0

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted."""
        path = sandbox_path(path)
        out = self._sh(
            '[ -d "$1" ] || { ls -d -- "$1" >/dev/null; echo "Not a directory" >&2; exit 1; }; ls -A1 -- "$1"',
            path,
            op="listdir",
            path=path,
        )
        return sorted(x for x in out.decode().split("\n") if x)

    def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        """Create a directory (and its parents unless ``parents=False``); existing ones are fine."""
        path = sandbox_path(path)
        flag = "-p" if parents else ""
        self._sh(f'[ -d "$1" ] || mkdir {flag} -m "$2" -- "$1"', path, f"{mode:o}", op="mkdir", path=path)

    def stat(self, path: str, follow_symlinks: bool = True) -> FileInfo:
        """The file's status (symlinks followed inside the container unless ``follow_symlinks=False``)."""
        path = sandbox_path(path)
        return stat_info(self._sh(STAT_SH, path, "1" if follow_symlinks else "0", op="stat", path=path), path)

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file, creating its parent directories; a symlink is written through, inside."""
        path = sandbox_path(path)
        if isinstance(data, str):
            data = data.encode()
        # One exec (each costs a Docker round trip): make the parent, resolve a symlink inside the
        # container, and check that the directory it lands in exists.
        script = (
            'mkdir -p -- "$(dirname -- "$1")" && r=$(readlink -f -- "$1") || r=$1; '
            '[ -d "$(dirname -- "$r")" ] || { echo "No such file or directory" >&2; exit 1; }; echo "$r"'
        )
        real = self._sh(script, path, op="write", path=path).decode().strip() or path
        self._sb.container.put_archive(posixpath.dirname(real), tar_file(posixpath.basename(real), data, mode))

    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, a symlink, an empty directory, or with ``recursive=True`` a whole tree."""
        path = sandbox_path(path)
        rm = 'rm -rf -- "$1"' if recursive else 'rmdir -- "$1"'
        self._sh(f'if [ -d "$1" ] && [ ! -L "$1" ]; then {rm}; else rm -- "$1"; fi', path, op="remove", path=path)

    def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """Copy a host file or directory tree to ``path`` in the container (modes and symlinks kept)."""
        path = sandbox_path(path)
        src = Path(local)
        if not os.path.lexists(src):
            raise ConfigError(f"cannot upload {src}: it does not exist")
        self.mkdir(posixpath.dirname(path))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(str(src), arcname=posixpath.basename(path), recursive=True)
        self._sb.container.put_archive(posixpath.dirname(path), buf.getvalue())

    def download(self, path: str, local: str | os.PathLike[str], max_size: int = DEFAULT_MAX_DOWNLOAD) -> None:
        """Copy a container file or tree to the host path ``local`` (the local engine's rules:
        links recreated, never followed, no setuid bits, special files skipped, ``max_size``)."""
        path = sandbox_path(path)
        with self._archive(path, "download", max_size) as tf:
            extract_tar(tf, Path(local), max_size, path)
