"""Live snapshots: a sandbox's processes, memory included, checkpointed with CRIU while they keep
running, and restored in fresh namespaces as often as forks ask.

How a checkpoint is taken (:meth:`Criu.dump`): ``criu dump --leave-running`` freezes every
process of the sandbox; while they are frozen (CRIU's ``post-dump`` action) the caller copies the
writable layer out, so files and memory are of one instant; then they go on. What the sandbox
has from the host (device nodes, ``/proc`` files, the host base's overlays) is declared external
and given again at restore; cgroup file systems under ``/sys`` are left out (a fork has no view
of the host's cgroups). The images hold process memory (secrets, keys): they live in the store,
which only the runner reads, and their digests are recorded and checked before every restore.

How a fork is restored (:meth:`Criu.restore`): in a mount namespace of its own below the
engine's (where the store is), the fork's overlays are mounted, a tmpfs covers ``/tmp`` (CRIU
writes temporary files there as the restored root, which may not write the store) and a fresh
sysfs stands for ``/sys``; ``criu restore --root`` then rebuilds the sandbox's mounts on the new
root and its processes in new namespaces, each copy with its own. The restored holder gets a new
lifeline from the runner (``--inherit-fd``), so a fork dies with its runner as every sandbox does.

Root only: CRIU needs ``CAP_CHECKPOINT_RESTORE`` (and more) in the initial user namespace.
CRIU 4.2 or newer: 3.17 fails on kernels >= 6.13 (the vDSO), 4.1 cannot dump TCP sockets on
kernels >= 6.16.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EngineUnavailableError, SandboxError, SnapshotError

__all__ = ["MIN_VERSION", "Criu", "External", "Images", "externals_of"]

MIN_VERSION = (4, 2)
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# What a sandbox has from the host, as the engine mounts it (by file system: the root of each
# bind, and where it is): device nodes (anywhere: /proc files are masked with /dev/null), the
# host's read-only /proc directories, /sys. A restore binds the same host paths again, as root:
# any other mount of these file systems (a command's own proc mount, a bind of /sys/class) would
# become a bind of the host's, so it is refused, as is any mount of a kind not listed.
_DEV_NODES = frozenset({"/null", "/zero", "/full", "/random", "/urandom", "/tty"})
_PROC_DIRS = frozenset({"/sys", "/irq", "/bus", "/fs"})
_SKIPPED = ("cgroup", "cgroup2", "securityfs", "debugfs", "tracefs", "fusectl", "configfs", "bpf", "pstore")


@dataclass(frozen=True)
class External:
    """A mount of the sandbox that comes from outside it: its mount point inside, the key CRIU
    knows it by, and where a restore takes it from (a host path, or ``overlay:NAME`` for the
    fork's own overlay of a host base directory)."""

    key: str
    mountpoint: str
    source: str

    def to_json(self) -> list[str]:
        return [self.key, self.mountpoint, self.source]


def externals_of(mountinfo: str, overlays: Collection[str] = ()) -> tuple[list[External], list[str]]:
    """The mounts of a sandbox (its ``/proc/PID/mountinfo``) that a checkpoint must declare
    external, and those it leaves out. ``overlays``: the host base's directories, each an overlay
    of its own a fork mounts anew. Raises :class:`SnapshotError` for a mount it cannot give back
    (one a command made: a bind mount, a file system from elsewhere)."""
    rows = [line.split(" - ", 1) for line in mountinfo.splitlines() if " - " in line]
    own_proc = next((a.split()[2] for a, _ in rows if a.split()[4] == "/proc"), "")
    out: list[External] = []
    skipped: list[str] = []
    for before, after in rows:
        fields, fstype = before.split(), after.split()[0]
        root, mountpoint = fields[3], fields[4]
        if mountpoint == "/" or fstype in ("tmpfs", "devpts", "mqueue") or (fstype == "proc" and fields[2] == own_proc):
            continue  # the sandbox's own: CRIU makes them again (tmpfs with its files)
        if fstype in _SKIPPED:
            skipped.append(mountpoint)
            continue
        if fstype == "overlay" and root == "/" and mountpoint.strip("/") in overlays:
            source = f"overlay:{mountpoint.strip('/')}"  # a host base directory's, mounted anew by the fork
        elif fstype == "devtmpfs" and root in _DEV_NODES:
            source = "/dev" + root
        elif fstype == "proc" and root in _PROC_DIRS and mountpoint == "/proc" + root:
            source = mountpoint
        elif fstype == "sysfs" and root == "/" and mountpoint == "/sys":
            source = "/sys"
        else:
            raise SnapshotError(
                f"a live snapshot cannot keep the mount at {mountpoint} ({fstype}): unmount it before the snapshot"
            )
        out.append(External(f"psb{len(out)}", mountpoint, source))
    return out, skipped


class Images:
    """A checkpoint's image files in the store, with the digest of each taken at dump time."""

    def __init__(self, path: Path, digests: Mapping[str, str]) -> None:
        self.path = path
        self.digests = dict(digests)

    @classmethod
    def seal(cls, path: Path, group: int) -> Images:
        """Digest every image file of ``path`` and make them read-only, to root and ``group``:
        CRIU reads some of them as the restored root (the sandboxes' group), after entering the
        restored user namespace. No sandbox can reach the store to read them otherwise."""
        digests = {}
        for f in sorted(path.glob("*.img")):
            if f.is_file():
                digests[f.name] = _digest(f)
                os.chown(f, 0, group)
                f.chmod(0o440)
        os.chown(path, 0, group)
        path.chmod(0o710)
        return cls(path, digests)

    def remember(self) -> None:
        """Note the files as checked (just sealed, at their place in the store)."""
        for name, digest in self.digests.items():
            _remember(self.path / name, _stamp(self.path / name), digest)

    def check(self) -> None:
        """Every image file is there and as it was dumped; else a :class:`SandboxError`: restoring
        a changed image would run what it says, as root. A file this process has checked and
        that has not been touched since (same inode, size, mtime and ctime, which no write or
        utime can leave as they were) is not hashed again: a fork of a hot snapshot saves ~40 ms
        per 50 MB of memory."""
        found = {f.name for f in self.path.glob("*.img")}
        if found != set(self.digests):
            raise SandboxError(
                f"the live snapshot's process images at {self.path} were added to or removed from; refusing to "
                "restore them. Take the live snapshot again."
            )
        for name, digest in self.digests.items():
            path = self.path / name
            seen = _stamp(path)
            if seen is not None and _CHECKED.get(str(path)) == (seen, digest):
                continue
            if _digest(path) != digest:
                raise SandboxError(
                    f"the live snapshot's process image {name} changed since it was taken; refusing to restore it. "
                    "Take the live snapshot again."
                )
            _remember(path, seen, digest)


# Image files found intact, by path: what they looked like when hashed, and their digest.
_CHECKED: dict[str, tuple[tuple[int, ...], str]] = {}
_CHECKED_LOCK = threading.Lock()


def _remember(path: Path, seen: tuple[int, ...] | None, digest: str) -> None:
    """Record that ``path`` had ``digest`` when it looked as ``seen`` (if it still does)."""
    with _CHECKED_LOCK:
        if seen is not None and _stamp(path) == seen:  # not changed while it was hashed
            _CHECKED[str(path)] = (seen, digest)


def _stamp(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Criu:
    """CRIU on this machine, as this process may use it: found at ``$PYTEST_SANDBOX_CRIU`` or on
    PATH, its version read and ``criu check`` run once (on first use). :attr:`reason` says why
    live snapshots cannot be taken here, with what to do; empty when they can."""

    def __init__(self, *, root: bool, nsenter: str) -> None:
        self._root = root
        self._nsenter = nsenter
        self._lock = threading.Lock()
        self._checked = False
        self._reason = ""
        self.path = os.environ.get("PYTEST_SANDBOX_CRIU") or shutil.which("criu", path=_ENV["PATH"]) or ""
        self.version = ""
        self._flock = shutil.which("flock", path=_ENV["PATH"]) or "flock"

    @property
    def reason(self) -> str:
        with self._lock:
            if not self._checked:
                self._reason = self._check()
                self._checked = True
            return self._reason

    def _check(self) -> str:
        if not self._root:
            return (
                "live snapshots need root: CRIU needs CAP_CHECKPOINT_RESTORE in the initial user namespace, which "
                "a rootless runner has not. Run as root, or take snapshots of files (live=False)"
            )
        if not self.path:
            return (
                "CRIU is not installed: live snapshots need CRIU 4.2 or newer (Debian sid's criu package; set "
                "PYTEST_SANDBOX_CRIU to its path if it is not on PATH)"
            )
        try:
            out = subprocess.run([self.path, "--version"], capture_output=True, text=True, env=_ENV, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"CRIU at {self.path} does not run ({exc}); install CRIU 4.2 or newer"
        m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
        if m is None:
            return f"CRIU at {self.path} says no version ({out.stdout.strip()[:100]!r}); install CRIU 4.2 or newer"
        self.version = m.group(0).split(":", 1)[1].strip()
        if (int(m.group(1)), int(m.group(2))) < MIN_VERSION:
            return (
                f"CRIU {self.version} is too old for this kernel (3.17 fails on 6.13 and newer, 4.1 cannot dump TCP "
                "sockets on 6.16 and newer): install CRIU 4.2 or newer"
            )
        check = subprocess.run([self.path, "check"], capture_output=True, text=True, env=_ENV, timeout=60)
        if check.returncode != 0:
            why = (check.stderr or check.stdout).strip().splitlines()
            return f"`criu check` fails here ({why[-1] if why else f'exit code {check.returncode}'})"
        return ""

    def require(self) -> None:
        """Raise :class:`EngineUnavailableError` with :attr:`reason` unless CRIU can be used."""
        if self.reason:
            raise EngineUnavailableError(self.reason)

    def dump(
        self,
        pid: int,
        images: Path,
        *,
        externals: Sequence[External],
        skip: Sequence[str],
        while_frozen: Callable[[], None],
    ) -> None:
        """Checkpoint the tree of sandbox init ``pid`` into ``images`` (a new directory) and let it
        run on. ``while_frozen`` runs while every process of it is stopped, after CRIU has read
        them: what it copies is of the same instant as the images."""
        work = images / ".hook"
        work.mkdir(parents=True)
        frozen, hold = work / "frozen", work / "hold"
        hook = work / "hook.sh"
        # CRIU runs its action script at each stage; at post-dump the tree is still frozen. The
        # hook says so (a file appears) and waits for the lock we hold: we release it once the
        # copy is made, and the kernel releases it if we are killed meanwhile, so the tree never
        # stays frozen for want of us.
        hook.write_text(
            '#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n'
            f": > {shlex.quote(str(frozen))}\nexec {shlex.quote(self._flock)} {shlex.quote(str(hold))} true\n"
        )
        hook.chmod(0o700)
        lock = os.open(hold, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        argv = [self.path, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "--leave-running"]
        argv += ["--tcp-established", "--action-script", str(hook)]
        for ext in externals:
            argv += ["--external", f"mnt[{ext.mountpoint}]:{ext.key}"]
        for mountpoint in skip:
            argv += ["--skip-mnt", mountpoint]
        failure: BaseException | None = None
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV
            )
            try:
                while proc.poll() is None and not frozen.exists():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.002)
                if proc.poll() is None:
                    try:
                        while_frozen()
                    except BaseException as exc:  # the tree must run on whatever happened here
                        failure = exc
                    fcntl.flock(lock, fcntl.LOCK_UN)
                proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        finally:
            os.close(lock)
            shutil.rmtree(work, ignore_errors=True)
        if failure is not None:
            raise failure
        if proc.returncode != 0:
            raise SnapshotError(
                f"CRIU could not checkpoint the sandbox (it runs on; take a snapshot of its files instead): "
                f"{self._why(images / 'dump.log', proc)}"
            )

    def restore(
        self,
        images: Path,
        *,
        helper_pid: int,
        store: Path,
        inside: Callable[[Path], str],
        mounts: Mapping[str, tuple[Sequence[str], Path, Path]],
        externals: Sequence[External],
        pipe: int,
        lifeline: int,
        cgroups: Mapping[str, str],
        pidfile: Path,
    ) -> int:
        """Restore the checkpoint in ``images``; returns the new tree's init pid (on the host).

        Runs in a mount namespace of its own below the engine's (``helper_pid``'s), where the
        store is at ``/tmp``: there it moves the store aside, mounts the fork's overlays
        (``mounts``: overlay name, "root" for "/", to its lower directories, upper and work
        directories, as store paths), and restores on them, CRIU and the restored processes
        in the fork's cgroups (``cgroups``: controller to its path in that hierarchy, ``unified``
        for v2). ``lifeline`` (a pipe's read end of ours)
        stands for the dumped holder's lifeline pipe, inode ``pipe``. ``inside`` maps a store
        path to the engine namespace's view of it."""
        aside = next((d for d in ("/mnt", "/media", "/srv") if os.path.isdir(d)), "")
        if not aside:
            raise EngineUnavailableError("a live restore needs an empty directory such as /mnt on this machine")

        def moved(path: Path) -> str:  # a store path as the restore sees it, once moved aside
            return aside + inside(path)[len("/tmp") :]

        script = [
            f"mount --rbind /tmp {aside}",
            "mount -t tmpfs -o mode=1777,size=64m psb-restore /tmp",
            "mkdir /tmp/sys",
            "mount -t sysfs sysfs /tmp/sys",  # /sys without the host's cgroup file systems below it
        ]
        where: dict[str, str] = {}
        for name, (lowers, upper, work) in mounts.items():
            target = upper.parent.parent / "m" / name
            lower = ":".join(moved(Path(x)) if x.startswith(str(store)) else x for x in reversed(lowers))
            opts = f"lowerdir={lower},upperdir={moved(upper)},workdir={moved(work)},userxattr,redirect_dir=nofollow"
            script.append(f"mount -t overlay psb-overlay -o {shlex.quote(opts)} {shlex.quote(moved(target))}")
            where[name] = moved(target)
        # Its log and statistics go to the fork's directory: the images stay as they were sealed.
        argv = [self.path, "restore", "-D", moved(images), "-W", moved(pidfile.parent), "-o", "restore.log"]
        argv += ["--root", where["root"]]
        argv += ["-d", "--pidfile", moved(pidfile), "--tcp-established", "--mntns-compat-mode"]
        argv += ["--inherit-fd", f"fd[{lifeline}]:pipe:[{pipe}]"]
        for controller, path in cgroups.items():  # the dumped tree's cgroup is the fork's there
            argv += ["--cgroup-root", path if controller == "unified" else f"{controller}:{path}"]
        for ext in externals:
            if ext.source.startswith("overlay:"):
                source = where[ext.source.split(":", 1)[1]]
            elif ext.source == "/sys":
                source = "/tmp/sys"
            else:
                source = ext.source
            argv += ["--external", f"mnt[{ext.key}]:{source}"]
        script.append("exec " + shlex.join(argv))
        line = [self._nsenter, "-t", str(helper_pid), "-m", "--", "unshare", "-m", "--propagation", "private", "--"]
        line += ["/bin/sh", "-ec", "; ".join(script)]
        for name in mounts:
            (pidfile.parent / "m" / name).mkdir(parents=True, exist_ok=True)
        try:
            res = subprocess.run(line, capture_output=True, text=True, env=_ENV, pass_fds=(lifeline,), timeout=300)
        except subprocess.TimeoutExpired as exc:  # killed; what it restored dies with its lifeline
            raise SandboxError(f"CRIU did not restore the live snapshot within {exc.timeout:.0f} s") from exc
        if res.returncode != 0:
            raise SandboxError(
                f"CRIU could not restore the live snapshot: {self._why(pidfile.parent / 'restore.log', res)}"
            )
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise SandboxError(f"CRIU restored the live snapshot but wrote no pid ({exc})") from exc

    @staticmethod
    def _why(log: Path, proc: Any) -> str:
        """The errors of a failed CRIU run, for its exception."""
        lines: list[str] = []
        with contextlib.suppress(OSError):
            lines = [
                x for x in log.read_text(errors="replace").splitlines() if "Error" in x and "RLIMIT_NOFILE" not in x
            ]
        if not lines:
            stderr = (
                proc.stderr if isinstance(proc.stderr, str) else (proc.stderr.read().decode() if proc.stderr else "")
            )
            lines = [x for x in stderr.splitlines() if x.strip()][-5:]
        return "; ".join(line.split(": ", 2)[-1] for line in lines[:5]) or f"exit code {proc.returncode}"
