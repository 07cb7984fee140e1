"""A filesystem of its own size under each sandbox's writable layer: the disk limit.

The overlay's upper and work directories live on that filesystem, so a write past the limit fails
with ENOSPC inside the sandbox, ``df`` there shows the limit, and the host's disk never holds more
than it (plus a few hundred KiB of metadata).

- As root: a sparse file formatted as ext4 (no journal, no resize reserve: a throwaway layer needs
  neither, and metadata stays under 200 KiB), loop-mounted with autoclear.
- Rootless, or as root without loop devices: a tmpfs of the asked size, which lives in memory, so
  it is capped at half the machine's memory (and says so in ``sb.limits``).

Either way the mount is made in the user-namespace helper's private mount namespace, where bwrap
starts, never in the host's mount table: when the helper and the sandboxes end (``kill -9`` of the
runner included) the kernel drops the mounts and the loop device detaches itself. The host reaches
the filesystem through ``/proc/<helper>/root``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._hostfs import copy_data
from .._lifeline import Channel, interpreter
from ..errors import SandboxError
from ..programs import source
from ..types import format_bytes

__all__ = ["Disk", "Disks"]


_MKFS_FEATURES = "^has_journal,^resize_inode,sparse_super2"
# One inode per 8 KiB: a node_modules or site-packages tree is many small files, and ext4's
# default (16 KiB) runs out of inodes before it runs out of space.
_BYTES_PER_INODE = "8192"


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)),
        None,
    )


def _half_memory() -> int:
    return max(1 << 30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)


def _copy_sparse(src: Path, dest: Path) -> None:
    """Copy ``src`` to a new file ``dest`` (mode 0600), its holes left holes."""
    with open(src, "rb") as s:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            copy_data(s.fileno(), fd, os.fstat(s.fileno()).st_size)
        finally:
            os.close(fd)


@dataclass
class Disk:
    """One sandbox's filesystem: ``path`` is where the host reaches it, ``launch`` where bwrap
    does; ``how`` says what holds it (for ``sb.limits``)."""

    path: Path
    launch: str
    size: int
    how: str
    release: Callable[[], None]


class Disks:
    """Makes :class:`Disk` s for one backend: ext4 on a loop device as root, tmpfs otherwise.

    ``enter`` is the nsenter command line into the helper's mount namespace (its pid is asked
    for late: the helper starts on first need), ``launch_path`` maps a store path to the path
    bwrap sees.
    """

    def __init__(
        self,
        *,
        rootless: bool,
        nsenter: str,
        helper_pid: Callable[[], int],
        launch_path: Callable[[Path], str],
        templates: Path,
    ) -> None:
        self._rootless = rootless
        self._templates = templates
        self._nsenter = nsenter
        self._helper_pid = helper_pid
        self._launch_path = launch_path
        self._mkfs = _tool("mkfs.ext4")
        self._lock = threading.Lock()
        self._mounter: Channel | None = None
        self.reason = ""
        self.ext4 = False
        if not rootless:
            if not os.path.exists("/dev/loop-control"):
                self.reason = "no loop devices here (/dev/loop-control)"
            elif self._mkfs is None:
                self.reason = "mkfs.ext4 is not installed (apt install e2fsprogs)"
            else:
                self.ext4 = True

    def _ask(self, op: str, a: str, b: str) -> None:
        """One request to the mounter (started on first need, in the helper's namespace)."""
        with self._lock:
            if self._mounter is None:
                creds = ["-U", "--preserve-credentials"] if self._rootless else []
                self._mounter = Channel(
                    source("mounter"), [self._nsenter, "-t", str(self._helper_pid()), *creds, "-m", "--"]
                )
            mounter = self._mounter
        try:
            answer, _ = mounter.call("\0".join((op, a, b)).encode())
        except OSError as exc:
            hint = ""
            if not self._rootless and interpreter().startswith("/tmp/"):  # host.MOUNT_POINT, as root
                hint = f": Python runs from {interpreter()}, which the engine's namespace covers; use one outside /tmp"
            raise SandboxError(f"the engine's mount helper is gone ({exc}){hint}; open a new backend") from exc
        if answer != b"ok":
            raise SandboxError(f"{op} of the sandbox's disk failed: {answer.decode(errors='replace') or 'no answer'}")

    def close(self) -> None:
        """Stop the mounter (the mounts stay until the helper's namespace goes)."""
        with self._lock:
            mounter, self._mounter = self._mounter, None
        if mounter is not None:
            mounter.close()

    def _run(self, argv: list[str], what: str) -> None:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SandboxError(f"{what} failed: {(res.stderr or res.stdout).strip() or f'exit {res.returncode}'}")

    def _template(self, size: int) -> Path:
        """A formatted image of ``size`` bytes, made once per size (copies are sparse, ~200 KiB)."""
        assert self._mkfs is not None
        path = self._templates / f"ext4-{size}.img"
        if path.exists():
            return path
        self._templates.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self._run(
                [self._mkfs, "-q", "-F", "-O", _MKFS_FEATURES, "-m", "0", "-i", _BYTES_PER_INODE,
                 "-E", "lazy_itable_init=1,nodiscard,num_backup_sb=0", "--", str(tmp)],
                "formatting the sandbox's disk image (mkfs.ext4)",
            )  # fmt: skip
            os.replace(tmp, path)  # whole or not at all: another process may be making it too
        except OSError as exc:  # EFBIG: this process runs under a file size limit (ulimit -f)
            raise SandboxError(f"cannot make a {format_bytes(size)} image file: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path

    def _ext4(self, image: Path, size: int, launch: str) -> str:
        try:
            _copy_sparse(self._template(size), image)
        except OSError as exc:
            raise SandboxError(f"cannot copy the disk image: {exc.strerror}") from exc
        self._ask("ext4", self._launch_path(image), launch)
        return f"ext4 image of {format_bytes(size)} on a loop device"

    def make(self, run_dir: Path, size: int) -> Disk:
        """Mount a ``size``-byte filesystem at ``run_dir/d`` (in the helper's namespace)."""
        mnt = run_dir / "d"
        mnt.mkdir()
        launch = self._launch_path(mnt)
        how = ""
        if self.ext4:
            try:
                how = self._ext4(run_dir / "disk.img", size, launch)
            except SandboxError as exc:  # e.g. loop devices that cannot be used: say so, use tmpfs
                self.ext4, self.reason = False, f"ext4 on a loop device: {exc}"
        if not how:
            held = min(size, _half_memory())
            self._ask("tmpfs", f"size={held},mode=0755", launch)
            why = "rootless: no loop devices for an unprivileged user" if self._rootless else self.reason
            how = f"tmpfs of {format_bytes(held)}, in memory ({why})"
            if held < size:
                how += ", capped at half the machine's memory"
        path = Path(f"/proc/{self._helper_pid()}/root{launch}")

        def release() -> None:
            # Lazy: a process of the dead sandbox may still be leaving; the kernel finishes it.
            self._ask("umount", launch, "")

        return Disk(path=path, launch=launch, size=size, how=how, release=release)
