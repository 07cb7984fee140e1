"""What every backend's builder shares: the shell form of recipe steps, the environment build
steps get, and the mmdebstrap call that makes a Debian rootfs tarball."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..api import Backend, ExecResult, LogCallback, Snapshot
from ..errors import (
    ConfigError,
    EngineUnavailableError,
    ExecTimeoutError,
    SandboxClosedError,
    SandboxError,
    SandboxFileError,
    SnapshotBuildError,
)
from ..image import Image, Step
from . import _proc
from ._safefs import HostTree

_HISTORY_TAIL = 4096  # characters of each stream a sandbox's history keeps (the failure report shows less)

__all__ = [
    "Watchdog",
    "SandboxBase",
    "KILL_TREE_SH",
    "BUILD_CA_PATH",
    "build_env",
    "build_recipe",
    "exec_argv",
    "exec_result",
    "file_error",
    "extract_tar",
    "host_ca_bundle",
    "mmdebstrap_tar",
    "resolve_snapshot",
    "run_step",
    "sandbox_path",
    "step_argv",
]

# Build steps use the host's network, so they also use its trust roots and proxy settings (a
# TLS-intercepting proxy is common in companies). The CA bundle is bound into bwrap's private /dev
# tmpfs so that nothing of it lands in the snapshot.
BUILD_CA_PATH = "/dev/.host-ca-certificates.crt"
# Kill a process and every descendant, found through /proc (no ps needed in the image).
KILL_TREE_SH = (
    "r=$1; ps=$(for s in /proc/[0-9]*/status; do p=${s#/proc/}; p=${p%/status}; "
    'pp=$(sed -n "s/^PPid:[[:space:]]*//p" $s 2>/dev/null); echo "$p $pp"; done | '
    'awk -v r="$r" \'{pp[$1]=$2} END {k[r]=1; do {n=0; for (p in pp) if ((pp[p] in k) && !(p in k)) '
    "{k[p]=1; n++}} while (n); for (p in k) print p}'); "
    "for p in $ps; do kill -KILL $p 2>/dev/null; done; true"  # the shell's kill: images may lack /bin/kill
)
_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def host_ca_bundle() -> str | None:
    import ssl

    for cand in (
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ):
        if cand and os.path.isfile(cand):
            return cand
    return None


def build_env(ca_path: str = BUILD_CA_PATH) -> dict[str, str]:
    """Environment for build steps: host proxies, and the host CA bundle found at ``ca_path``."""
    env = {k: v for k, v in os.environ.items() if k in _PROXY_VARS}
    if host_ca_bundle():
        for var in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            env[var] = ca_path
    return env


def step_argv(step: Step) -> list[str]:
    if step.kind == "run":
        return ["/bin/sh", "-c", step.args[0]] if len(step.args) == 1 else list(step.args)
    if step.kind == "apt":
        pkgs = " ".join(shlex.quote(p) for p in step.args)
        # APT::Sandbox::User=root: rootless sandboxes map a single uid, so apt cannot drop to _apt.
        return [
            "/bin/sh",
            "-c",
            "export DEBIAN_FRONTEND=noninteractive; "
            "apt-get -o APT::Sandbox::User=root update -q && "
            f"apt-get -o APT::Sandbox::User=root install -y -q --no-install-recommends {pkgs} && "
            "apt-get clean && rm -rf /var/lib/apt/lists/*",
        ]
    if step.kind == "pip":
        return [
            "/bin/sh",
            "-c",
            "PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 "
            "python3 -m pip install --no-cache-dir " + " ".join(shlex.quote(p) for p in step.args),
        ]
    raise AssertionError(step.kind)


def mmdebstrap_tar(base: dict[str, Any], key: str, out: Path, nsteps: int, log: LogCallback) -> None:
    """Build the Debian rootfs of an ``Image.debian`` base into the tarball ``out``."""
    mm = shutil.which("mmdebstrap")
    if mm is None:
        raise EngineUnavailableError(
            "Image.debian() needs mmdebstrap, which is not installed: run `sudo apt-get install "
            "mmdebstrap` (Debian/Ubuntu), or use Image.from_rootfs(...) with a rootfs tarball."
        )
    argv = [mm, f"--variant={base['variant']}", "--format=tar"]
    if base.get("include"):
        argv.append("--include=" + ",".join(base["include"]))
    argv += [base["suite"], str(out)]
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(line)
        log(line)

    res = _proc.run(argv, on_line=keep, env={**os.environ, "LC_ALL": "C.UTF-8"}, die_with_parent=True)
    if res.returncode != 0:
        raise SnapshotBuildError(
            key=key,
            step_index=0,
            step_count=nsteps,
            step=f"FROM debian:{base['suite']}",
            exit_code=res.returncode,
            output="\n".join(lines),
        )


def build_recipe(
    image: Image,
    *,
    get: Callable[[str], Snapshot | None],
    lock: Callable[[str], AbstractContextManager[object]],
    build_base: Callable[[Image, str, LogCallback], Snapshot],
    build_step: Callable[[Snapshot, Step, str, int, int, LogCallback], Snapshot],
    on_log: LogCallback | None,
    rebuild: bool | float,
) -> Snapshot:
    """The build loop every backend shares: one snapshot per prefix of the steps, each built under
    its key's lock by the first process to get there and reused by the others.

    ``rebuild=True`` ignores cached step snapshots; a timestamp ignores those created before it
    (so parallel workers of one run still build once). The base is always reused when present.
    """
    if not isinstance(image, Image):
        raise ConfigError(f"build() takes an Image, got {type(image).__name__}")
    log = on_log or (lambda _line: None)
    keys = image.prefix_keys()
    n = len(image.steps)

    def cached(key: str) -> Snapshot | None:
        snap = get(key)
        if snap is None or rebuild is True:
            return None
        if rebuild is not False and snap.created < float(rebuild):
            return None
        return snap

    hit = cached(keys[-1])
    if hit is not None:
        return hit
    with lock(keys[0]):
        current = get(keys[0]) or build_base(image, keys[0], log)
    for i, step in enumerate(image.steps, start=1):
        with lock(keys[i]):
            hit = cached(keys[i])
            if hit is not None:
                current = hit
                continue
            log(f"[{i}/{n}] {step.describe()}")
            current = build_step(current, step, keys[i], i, n, log)
    return current


def resolve_snapshot(backend: Backend, what: Snapshot | Image | str) -> Snapshot:
    """What ``create()`` accepts, as a snapshot of ``backend``: an Image is built, a string looked up."""
    if isinstance(what, Image):
        return backend.build(what)
    if isinstance(what, str):
        return backend.get_snapshot(what)
    if not isinstance(what, Snapshot):
        raise ConfigError(f"create() takes a Snapshot, an Image or a key, got {what!r}")
    if what.backend != backend.name:
        raise ConfigError(f"snapshot {what.short} belongs to the {what.backend} backend")
    return what


def exec_argv(command: str | Sequence[str]) -> list[str]:
    """``exec()``'s command as an argv: a string runs through ``/bin/sh -c``."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"exec() takes a string or a non-empty list of strings, got {command!r}")
    return argv


def run_step(
    sb: Any, step: Step, *, key: str, index: int, count: int, workdir: str, env: dict[str, str], log: LogCallback
) -> str:
    """Run one file-changing step (copy, workdir, run, apt, pip) in a build sandbox of any backend.

    Returns the working directory after the step; a failure becomes a :class:`SnapshotBuildError`
    carrying the step, its exit code and its output.
    """
    output: list[str] = []

    def keep(line: str) -> None:
        output.append(line)
        log("    " + line)

    def fail(code: int | None, reason: str = "") -> SnapshotBuildError:
        return SnapshotBuildError(
            key=key,
            step_index=index,
            step_count=count,
            step=step.describe(),
            exit_code=code,
            output="\n".join(output),
            reason=reason,
        )

    if step.kind == "copy":
        assert step.source is not None
        try:
            sb.fs.upload(step.source, step.args[0])
            if step.mode is not None:
                sb.exec(["chmod", f"{step.mode:o}", step.args[0]]).check()
        except (OSError, SandboxError) as exc:
            raise fail(None, f"copy failed: {exc}") from exc
        return workdir
    if step.kind == "workdir":
        sb.fs.mkdir(step.args[0])
        return str(step.args[0])
    try:
        res = sb._run(step_argv(step), cwd=workdir, env={**env, **dict(step.env)}, on_line=keep)
    except ExecTimeoutError as exc:
        raise fail(None, "timed out") from exc
    if res.exit_code != 0:
        raise fail(res.exit_code)
    return workdir


def exec_result(
    history: list[ExecResult],
    argv: Sequence[str],
    *,
    exit_code: int,
    stdout: bytes,
    stderr: bytes,
    duration: float,
    timed_out: bool,
    timeout: float | None,
    truncated: bool = False,
    max_output: int | None = None,
) -> ExecResult:
    """Record one exec in a sandbox's history; raise :class:`ExecTimeoutError` if it timed out.

    Output longer than ``max_output`` (default :data:`DEFAULT_MAX_OUTPUT`) per stream is cut
    in the middle with a marker. The history keeps each command's output tail only: a sandbox
    running thousands of commands must not hold all their output.
    """
    limit = _proc.DEFAULT_MAX_OUTPUT if max_output is None else max_output
    stdout, cut_out = _proc.clip(stdout, limit)
    stderr, cut_err = _proc.clip(stderr, limit)
    shown = argv[2] if len(argv) == 3 and list(argv[:2]) == ["/bin/sh", "-c"] else shlex.join(argv)
    result = ExecResult(
        command=shown,
        exit_code=exit_code,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
        duration=duration,
        timed_out=timed_out,
        truncated=truncated or cut_out or cut_err,
    )
    history.append(
        dataclasses.replace(result, stdout=result.stdout[-_HISTORY_TAIL:], stderr=result.stderr[-_HISTORY_TAIL:])
    )
    if timed_out:
        raise ExecTimeoutError(
            result,
            f"`{shown}` timed out after {timeout}s; its whole process tree was killed "
            "(the sandbox itself is still usable)",
        )
    return result


def extract_tar(tf: tarfile.TarFile, dest: Path, max_size: int, path: str) -> None:
    """Unpack a tar whose first path component is the downloaded item into ``dest``, with
    :class:`HostTree`'s rules: symlinks recreated, never followed (nor ones already on the host),
    no member outside ``dest``, no setuid or setgid, FIFOs and devices skipped, ``max_size``."""
    tree = HostTree(dest, max_size, path)
    try:
        for member in tf:
            parts = tuple(member.name.split("/")[1:])
            if any(p in ("..", "", ".") for p in parts) or member.name.startswith("/"):
                continue
            if member.isdir():
                tree.directory(parts, member.mode)
            elif member.issym():
                tree.symlink(parts, member.linkname)
            elif member.isfile():
                tree.file(parts, member.mode, tf.extractfile(member))
    finally:
        tree.close()


def sandbox_path(path: str) -> str:
    """A sandbox path, normalised; relative paths are refused (they would depend on a cwd)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"sandbox paths are absolute, like '/work/file.txt'; got {path!r}")
    return posixpath.normpath(path).replace("//", "/")


_ERRNO = (
    ("no such file", errno.ENOENT),
    ("not found", errno.ENOENT),
    ("not a directory", errno.ENOTDIR),
    ("is a directory", errno.EISDIR),
    ("not empty", errno.ENOTEMPTY),
    ("exists", errno.EEXIST),
    ("denied", errno.EACCES),
)


def file_error(text: str, op: str, path: str) -> SandboxFileError:
    """The :class:`SandboxFileError` for a failure a remote sandbox described in words."""
    num = next((n for s, n in _ERRNO if s in text.lower()), errno.EIO)
    what = {
        errno.ENOENT: "no such file or directory",
        errno.ENOTEMPTY: "directory not empty (pass recursive=True)",
        errno.ENOTDIR: "not a directory",
        errno.EISDIR: "is a directory",
    }.get(num, text.strip())
    return SandboxFileError(num, f"{op} {path}: {what}")


_S = TypeVar("_S", bound="SandboxBase")


class SandboxBase:
    """What every backend's Sandbox shares: ``with`` support, the closed check, and ``exec`` turning
    its command into an argv for the backend's ``_run``."""

    id: str
    _closed: bool

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed; create a new one")

    def _run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        on_line: LogCallback | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        raise NotImplementedError

    def exec(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command in the sandbox and wait for it.

        A string runs through ``/bin/sh -c``; a list is an argv. Processes it leaves in the
        background keep running for later commands. On ``timeout`` every process the command
        started is killed and :class:`ExecTimeoutError` is raised with the output so far.
        At most ``max_output`` bytes (default 16 MiB) of stdout, and of stderr, are kept: the
        first and last halves, with a marker between them, and ``truncated`` set.
        """
        return self._run(exec_argv(command), cwd=cwd, env=env, input=input, timeout=timeout, max_output=max_output)


class Watchdog:
    """A process that runs ``script`` once this one is gone: it waits for EOF on a pipe only we hold,
    so it fires on a clean exit and on ``kill -9`` alike. Started on first need."""

    def __init__(self, script: str, *args: str) -> None:
        self._argv = [sys.executable, "-c", script, *args]
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def ensure(self) -> None:
        """Start the watchdog unless it runs."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    self._argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )

    def fire(self) -> None:
        """Let it run its script now (we are closing) and wait for it."""
        if self.proc is not None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            self.proc.wait()
