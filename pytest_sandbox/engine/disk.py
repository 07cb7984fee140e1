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

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SandboxError
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


@dataclass
class Disk:
    """One sandbox's filesystem: ``path`` is where the host reaches it, ``launch`` where bwrap
    does; ``how`` says what holds it (for ``sb.limits``)."""

    path: Path
    launch: str
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
    ) -> None:
        self._rootless = rootless
        self._nsenter = nsenter
        self._helper_pid = helper_pid
        self._launch_path = launch_path
        self._mount = _tool("mount")
        self._umount = _tool("umount")
        self._mkfs = _tool("mkfs.ext4")
        self.reason = ""
        self.ext4 = False
        if self._mount is None or self._umount is None:
            self.reason = "mount/umount are not installed (apt install mount)"
        elif not rootless:
            if not os.path.exists("/dev/loop-control"):
                self.reason = "no loop devices here (/dev/loop-control)"
            elif self._mkfs is None:
                self.reason = "mkfs.ext4 is not installed (apt install e2fsprogs)"
            else:
                self.ext4 = True

    @property
    def usable(self) -> bool:
        return self._mount is not None and self._umount is not None

    def _enter(self) -> list[str]:
        creds = ["-U", "--preserve-credentials"] if self._rootless else []
        return [self._nsenter, "-t", str(self._helper_pid()), *creds, "-m", "--"]

    def _run(self, argv: list[str], what: str) -> None:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SandboxError(f"{what} failed: {(res.stderr or res.stdout).strip() or f'exit {res.returncode}'}")

    def _ext4(self, image: Path, size: int, launch: str) -> str:
        assert self._mkfs is not None and self._mount is not None
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:  # EFBIG: this process runs under a file size limit (ulimit -f)
            raise SandboxError(f"cannot make a {format_bytes(size)} image file: {exc.strerror}") from exc
        self._run(
            [self._mkfs, "-q", "-F", "-O", _MKFS_FEATURES, "-m", "0", "-i", _BYTES_PER_INODE,
             "-E", "lazy_itable_init=1,nodiscard,num_backup_sb=0", str(image)],
            "formatting the sandbox's disk image (mkfs.ext4)",
        )  # fmt: skip
        opts = "loop,nosuid,nodev,noatime"
        self._run([*self._enter(), self._mount, "-o", opts, self._launch_path(image), launch], "mounting it")
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
            assert self._mount is not None
            held = min(size, _half_memory())
            opts = f"size={held},mode=0755,nosuid,nodev"
            self._run([*self._enter(), self._mount, "-t", "tmpfs", "-o", opts, "sandbox-disk", launch], "mounting it")
            why = "rootless: no loop devices for an unprivileged user" if self._rootless else self.reason
            how = f"tmpfs of {format_bytes(held)}, in memory ({why})"
            if held < size:
                how += ", capped at half the machine's memory"
        path = Path(f"/proc/{self._helper_pid()}/root{launch}")

        def release() -> None:
            assert self._umount is not None
            # Lazy: a process of the dead sandbox may still be leaving; the kernel finishes it.
            self._run([*self._enter(), self._umount, "-l", launch], "unmounting the sandbox's disk")

        return Disk(path=path, launch=launch, how=how, release=release)
