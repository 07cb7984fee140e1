"""The toolbox, the daemon Daytona runs in every sandbox: commands and files, as it answers them.

Blocking and thread-safe like :mod:`.state`, whose records it works on.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterator

from ..errors import ExecTimeoutError, SandboxClosedError, SandboxFileError
from ..types import ExecResult, Sandbox
from .records import DAEMON, ApiError, FileStat
from .state import EndpointState

__all__ = ["Toolbox"]

# As Daytona's daemon: the first of these that exists runs toolbox commands.
_SHELLS = ("/usr/bin/zsh", "/bin/zsh", "/bin/bash", "/usr/bin/bash", "/bin/sh")


def _file_error(exc: SandboxFileError) -> ApiError:
    if exc.errno == errno.ENOENT:
        return ApiError(404, str(exc), "FILE_NOT_FOUND", DAEMON)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ApiError(403, str(exc), "FILE_ACCESS_DENIED", DAEMON)
    return ApiError(400, str(exc), None, DAEMON)


@contextlib.contextmanager
def _daemon_errors() -> Iterator[None]:
    # File operations fail as the daemon's do; a path the backend refuses to take (a NUL byte,
    # a relative path: ValueError, ConfigError) is the client's mistake, not the endpoint's.
    try:
        yield
    except SandboxFileError as exc:
        raise _file_error(exc) from exc
    except SandboxClosedError as exc:
        raise ApiError(409, str(exc), None, DAEMON) from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), None, DAEMON) from exc


class Toolbox:
    """The toolbox of every started sandbox of ``state``."""

    def __init__(self, state: EndpointState) -> None:
        self.state = state

    # -- processes ---------------------------------------------------------------------------
    def execute(
        self, sid: str, command: str, cwd: str | None, envs: dict[str, str] | None, timeout: int | None
    ) -> ExecResult:
        """Run ``command`` as Daytona's daemon does: in the first of zsh, bash, sh, with stderr
        joined to stdout. ``timeout`` in seconds, None or 0 for none."""
        box, sb = self.state.running(sid)
        try:
            if box.shell is None:
                box.shell = next((s for s in _SHELLS if sb.fs.exists(s)), "/bin/sh")
            res = sb.exec(
                [box.shell, "-c", "exec 2>&1\n" + command], cwd=cwd or None, env=envs or None, timeout=timeout
            )
        except ExecTimeoutError as exc:
            raise ApiError(
                408, f"command timed out after {timeout} seconds", "PROCESS_EXECUTION_TIMEOUT", DAEMON
            ) from exc
        except SandboxClosedError as exc:
            raise ApiError(409, str(exc), None, DAEMON) from exc
        except ValueError as exc:  # e.g. a relative cwd
            raise ApiError(400, str(exc), None, DAEMON) from exc
        finally:
            box.activity = time.time()
        if res.timed_out:  # a backend may report it rather than raise
            raise ApiError(408, f"command timed out after {timeout} seconds", "PROCESS_EXECUTION_TIMEOUT", DAEMON)
        return res

    # -- files -------------------------------------------------------------------------------
    @staticmethod
    def _stat(sb: Sandbox, path: str, name: str, follow: bool = True) -> FileStat:
        s = sb.fs.stat(path, follow_symlinks=follow)
        return FileStat(name=name, mode=s.st_mode, size=s.st_size, mtime=s.st_mtime, uid=s.st_uid, gid=s.st_gid)

    def file_info(self, sid: str, path: str) -> FileStat:
        """A file's status, symlinks followed."""
        _, sb = self.state.running(sid)
        with _daemon_errors():
            return self._stat(sb, path, path.rstrip("/").rsplit("/", 1)[-1])

    def list_files(self, sid: str, path: str) -> list[FileStat]:
        """The entries of a directory (symlinks not followed)."""
        _, sb = self.state.running(sid)
        with _daemon_errors():
            return [self._stat(sb, f"{path.rstrip('/')}/{n}", n, False) for n in sb.fs.listdir(path)]

    def create_folder(self, sid: str, path: str, mode: int) -> None:
        """Create a directory and its parents; existing ones are fine."""
        _, sb = self.state.running(sid)
        with _daemon_errors():
            sb.fs.mkdir(path, parents=True, mode=mode)

    def delete_file(self, sid: str, path: str, recursive: bool) -> None:
        """Delete a file, or a directory tree when ``recursive``."""
        _, sb = self.state.running(sid)
        with _daemon_errors():
            sb.fs.remove(path, recursive=recursive)

    def _in_sandbox(self, sid: str, argv: list[str]) -> None:
        _, sb = self.state.running(sid)
        with _daemon_errors():
            res = sb.exec(argv)
        if not res.ok:
            raise ApiError(404 if "No such file" in res.stderr else 400, res.stderr.strip(), None, DAEMON)

    def move_file(self, sid: str, source: str, destination: str) -> None:
        """Rename ``source`` to ``destination`` inside the sandbox."""
        self._in_sandbox(sid, ["mv", "--", source, destination])

    def set_permissions(self, sid: str, path: str, mode: str, owner: str, group: str) -> None:
        """chmod and chown as the toolbox does (each only when given); ``mode`` as chmod takes it."""
        if mode:
            self._in_sandbox(sid, ["chmod", mode, "--", path])
        who = owner + (":" + group if group else "")
        if who:
            self._in_sandbox(sid, ["chown", who, "--", path])

    def write_files(self, sid: str, files: list[tuple[str, bytes]]) -> None:
        """Write each ``(path, data)`` (parents created as needed)."""
        _, sb = self.state.running(sid)
        with _daemon_errors():
            for path, data in files:
                sb.fs.write(path, data)

    def read_files(self, sid: str, paths: list[str]) -> list[bytes | ApiError]:
        """Each file's content, or the error reading it gave (a bulk download reports each)."""
        _, sb = self.state.running(sid)
        out: list[bytes | ApiError] = []
        for path in paths:
            try:
                with _daemon_errors():
                    out.append(sb.fs.read(path))
            except ApiError as exc:
                out.append(exc)
        return out
