"""One sandbox of the local engine, from start to close, and what a backend's sandboxes share.

:class:`Engine` holds what every sandbox of one backend takes from: the store and the host,
cgroups made ahead of need (each with its command helper already inside), sandbox directories
with a disk already mounted, the reaper that kills every sandbox once the runner is gone, the
port forwarder and the socket maker, and CRIU.

:class:`EngineSandbox` is one sandbox's life: its directories (the writable layer, on its disk
where it has one), its cgroup and limits, its namespaces (started with bwrap, or restored from a
live snapshot with CRIU), its network (an uplink, forwarded ports), how a command enters it, and
how it is frozen: its files (:meth:`EngineSandbox.freeze`) or its files and processes
(:meth:`EngineSandbox.checkpoint`). The backend's sandbox (``backends/local.py``) adapts it to
the :class:`~pytest_sandbox.types.Sandbox` contract: commands and their output, files, services.

Every sandbox's init is the holder (bwrap ``--as-pid-1``): a shell that reaps what is orphaned
inside and, once its stdin (a pipe only the runner writes) reaches EOF, kills everything in the
sandbox. No process of bwrap's stays inside, so CRIU can take the whole tree.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _proc
from .._lifeline import Reaper
from ..errors import EngineUnavailableError, SandboxClosedError, SandboxError, SnapshotError, say_once
from ..store import Store, new_id, rmtree
from ..types import Limits, LimitStatus, Network, Snapshot
from .cgroups import Cgroup
from .disk import Disk
from .expose import Exposure, Forwarder, SocketMaker
from .freeze import copy_upper, freeze, publish
from .host import Host
from .limits import apply_to_running, rlimit_values, rlimits_for
from .live import Criu, External, Images, externals_of
from .net import RESOLV_CONF, Uplink
from .pool import Spares
from .spawn import Confined, Entered, Spawner

__all__ = ["INSIDE_MIN_MEMORY", "Engine", "EngineSandbox"]

INSIDE_MIN_MEMORY = 256 << 20
"""The smallest memory limit held by an rlimit (``RLIMIT_AS``, which the sandbox's own helper
lives under too) that the exec fast path is used with."""


class Engine:
    """What the sandboxes of one backend share on this machine (see the module)."""

    def __init__(self, store: Store, host: Host, limits: Limits) -> None:
        self.store = store
        self.host = host
        self.limits = limits
        self.lock = threading.Lock()
        self.reaper = Reaper()  # kills every sandbox's init once we are gone, however we go
        self.forwarder = Forwarder()
        self.criu = Criu(root=host.ids is not None, nsenter=host.nsenter)
        self._maker: SocketMaker | None = None
        self.slots: Spares[tuple[Cgroup, Confined]] = Spares(self._new_slot, _drop_slot)
        # Sandbox directories with a disk of the default size already mounted: mounting costs
        # more than the rest of a fork, so a fork (a search tree's node) does not wait for it.
        self.ready_disks: Spares[tuple[str, Path, Disk]] = Spares(self._new_disk_dir, self._drop_disk_dir)

    def _new_slot(self) -> tuple[Cgroup, Confined]:
        cg = self.host.cgroups.create(self.store.owner, new_id(6))
        try:
            return cg, self.host.spawner.confined(cg.procs)
        except BaseException:
            cg.remove()
            raise

    def _new_disk_dir(self) -> tuple[str, Path, Disk]:
        sid = new_id(6)
        size = self.limits.disk_bytes
        assert size is not None
        with self.store.shared():
            d = self.store.register_sandbox(sid, {"layers": [], "spare": True})
        try:
            return sid, d, self.host.disks.make(d, size)
        except BaseException:
            self.store.discard(d)
            raise

    def _drop_disk_dir(self, item: tuple[str, Path, Disk]) -> None:
        self.store.discard(item[1], then=item[2].release)

    def take_disk_dir(self, limits: Limits) -> tuple[str, Path, Disk] | None:
        """A spare sandbox directory with its disk mounted, when ``limits`` ask for the default
        disk and disks can be made here; else None (the sandbox makes its own)."""
        if limits.disk_bytes != self.limits.disk_bytes or not self.host.disks.ext4:
            return None
        try:
            return self.ready_disks.take()
        except SandboxError:
            return None

    def socket_maker(self) -> SocketMaker:
        """The helper that makes sockets inside sandboxes' networks (started on first need)."""
        with self.lock:
            if self._maker is None:
                enter = []
                if self.host.rootless:  # the sandboxes' user namespace holds the right to enter them
                    enter = [self.host.nsenter, "-t", str(self.host.userns.pid), "-U", "--preserve-credentials", "--"]
                self._maker = SocketMaker(enter)
            return self._maker

    def close(self) -> None:
        """Stop what was made ahead of need and the helpers (after every sandbox is closed)."""
        self.slots.close()
        self.ready_disks.close()
        self.forwarder.close()
        self.reaper.close()
        if self._maker is not None:
            self._maker.close()


def lock_holders(init: int) -> str:
    """The processes of the sandbox of ``init`` that hold file locks, as "COMMAND (pid N)" (its
    pids as the sandbox sees them), from the host's /proc/locks: what CRIU will not checkpoint."""
    try:
        ns = os.readlink(f"/proc/{init}/ns/pid")
        with open("/proc/locks") as f:
            rows = [line.split() for line in f]
        pids = {int(row[4]) for row in rows if len(row) > 4 and row[4].isdigit()}
    except (OSError, ValueError):
        return ""
    found = []
    for pid in sorted(pids):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != ns:
                continue
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            inner = status.get("NSpid", "").split()[-1]
            found.append(f"{status.get('Name', '?').strip()} (pid {inner} in the sandbox)")
        except (OSError, ValueError, IndexError):
            continue
    return ", ".join(found)


def _drop_slot(slot: tuple[Cgroup, Confined]) -> None:
    slot[1].close()
    slot[0].remove()


class _Lifeline:
    """The runner's hold on a sandbox: the write end of its holder's stdin (closing it makes the
    holder kill everything inside) and its init, whose exit ends the sandbox."""

    def __init__(self, pid: int, write_end: int, bwrap: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._fd = write_end
        self._bwrap = bwrap  # bwrap waits for its sandbox's init, and is reaped after it
        self._lock = threading.Lock()
        self.inode = os.fstat(write_end).st_ino  # the pipe a checkpoint names, to be given anew
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = -1

    def poll(self) -> bool:
        """True once the init has exited."""
        with self._lock:
            if self._pidfd < 0:
                return True
            # poll, not select: a runner with a thousand sandboxes holds fds past select's limit
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            return bool(poller.poll(0))

    def kill(self) -> None:
        """SIGKILL the init through its pidfd: never a process that took its pid after it died
        (sandbox code can end its sandbox whenever it likes)."""
        with self._lock:
            if self._pidfd >= 0:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def cut(self) -> None:
        """Close the write end: the holder ends the sandbox. Idempotent."""
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def wait(self) -> None:
        """Until the init has exited (after :meth:`cut`, or a kill), and bwrap is reaped."""
        with self._lock:
            fd = self._pidfd
        if fd >= 0:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()
            with self._lock:
                self._pidfd = -1
            os.close(fd)
        if self._bwrap is not None:
            self._bwrap.wait()


class EngineSandbox:
    """One sandbox of the local engine (see the module). ``snapshot`` is what it starts from:
    its layers, and, for a live snapshot, the processes it restores."""

    def __init__(
        self,
        engine: Engine,
        snapshot: Snapshot,
        *,
        network: Network | None,
        limits: Limits,
        proxies: Mapping[int, tuple[str, int]] | None = None,
    ) -> None:
        self.engine = engine
        self.snapshot = snapshot
        self.network = network
        self.proxies = dict(proxies or {})
        self.limits = limits
        self.id = new_id(6)
        self.pid = 0
        self.cgroup: Cgroup | None = None
        self.status: dict[str, LimitStatus] = {}
        self.uplink: Uplink | None = None
        self.forwarded: list[Exposure] = []  # host ports reached from inside (a build's proxy)
        self._prlimit: list[str] = []
        self._helper: Confined | None = None
        self._inside: Entered | None = None
        self._inside_lock = threading.Lock()
        self._inside_failed = False
        self._lifeline: _Lifeline | None = None
        self._closed = False
        store = engine.store
        with store.shared():
            if not all(store.layer_path(x).is_dir() for x in snapshot.layers):
                raise SandboxClosedError(
                    f"snapshot {snapshot.short} lost its layers (removed or pruned); build it again"
                )
            meta = {"layers": list(snapshot.layers), "snapshot": snapshot.key}
            # Where the writable layer lives (its disk, once mounted), as the host and as bwrap see it.
            self.disk: Disk | None = None
            spare = engine.take_disk_dir(limits)
            if spare is not None:
                self.id, self.dir, self.disk = spare
                store.set_sandbox_meta(self.dir, meta)
                self.scratch, self._scratch_launch = self.disk.path, self.disk.launch
            else:
                self.dir = store.register_sandbox(self.id, meta)
                self.scratch, self._scratch_launch = self.dir, engine.host.launch_path(self.dir)
        try:
            self._confine()
            if snapshot.process:
                self._restore()
            else:
                self._start()
        except BaseException:
            store.discard(self.dir, then=self._release)
            raise
        self.inside()  # now, not at the first command: a warm pool's sandbox has it ready

    # -- its limits --------------------------------------------------------------------------
    def _confine(self) -> None:
        """The sandbox's cgroup, disk and limits (or, without cgroups, the rlimits that stand in)."""
        host = self.engine.host
        if host.cgroups.usable:
            # A cgroup made ahead of need, its helper already inside: only the limits are set here.
            self.cgroup, self._helper = self.engine.slots.take()
            self.status = self.cgroup.apply(self.limits)
            v = host.cgroups.version
            why = f"its cgroup v{v} controller is not {'enabled for our cgroups' if v == 2 else 'mounted'}"
        else:
            why = host.cgroups.reason
            self._prlimit, self.status = rlimits_for(self.limits, host.prlimit)
        size = self.limits.disk_bytes
        if self.disk is not None:
            self.status["disk"] = LimitStatus("disk", self.disk.size, True, self.disk.how)
        elif size is not None:
            self.status["disk"] = self._make_disk(size)
        for name, value in self.limits.items():
            if name not in self.status:
                self.status[name] = LimitStatus(name, value, False, why)
        unenforced = [s for s in self.status.values() if not s.enforced]
        if unenforced:
            say_once("; ".join(str(s) for s in unenforced))

    def _make_disk(self, size: int) -> LimitStatus:
        try:
            self.disk = self.engine.host.disks.make(self.dir, size)
        except SandboxError as exc:
            return LimitStatus("disk", size, False, str(exc))
        self.scratch, self._scratch_launch = self.disk.path, self.disk.launch
        return LimitStatus("disk", size, True, self.disk.how)

    @property
    def networked(self) -> bool:
        """Whether anything of the outside reaches into the sandbox's network namespace (an
        uplink, a forwarded proxy port): its commands then have no raw sockets or routes."""
        return self.network is not None or bool(self.proxies)

    # -- its start ---------------------------------------------------------------------------
    def _start(self) -> None:
        engine, host = self.engine, self.engine.host
        uplinks = host.uplinks
        if self.network is not None and not uplinks.usable:
            raise EngineUnavailableError(
                f"network=True gives a sandbox a network of its own, never the host's, and here {uplinks.reason}; "
                "or create it without network"
            )
        argv = host.bwrap_launcher()
        argv += host.mount_args(self.snapshot, self.scratch, self._scratch_launch)
        resolv = _proc.memfd("resolv.conf", RESOLV_CONF) if self.network is not None else -1
        seccomp = _proc.memfd("seccomp", host.seccomp)
        try:
            argv += host.sandbox_args(self.snapshot, network=self.networked, resolv=resolv)
            argv += ["--seccomp", str(seccomp)]
            proc, self.pid = host.launch(argv, [seccomp, *([resolv] if resolv >= 0 else [])])
        finally:
            for fd in (seccomp, resolv):
                if fd >= 0:
                    os.close(fd)
        assert proc.stdin is not None
        self._lifeline = _Lifeline(self.pid, os.dup(proc.stdin.fileno()), proc)
        proc.stdin.close()
        try:
            # bwrap started the holder outside the sandbox's limits
            apply_to_running(self.pid, self.limits, self.cgroup, rlimits=bool(self._prlimit))
            engine.reaper.watch(self.pid)
            self._connect()
        except BaseException:  # the sandbox goes (its uplink with it, in _release)
            self._kill()
            raise

    def _connect(self) -> None:
        """Its uplink, and the host ports forwarded into it."""
        engine = self.engine
        if self.network is not None:
            self.uplink = engine.host.uplinks.connect(self.pid, self.network, alive=self.alive)
            if self.cgroup is not None:  # what the sandbox makes it hold counts as the sandbox's
                self.cgroup.adopt([self.uplink.proc.pid])
        for port, target in self.proxies.items():  # a build step's proxy on the host's loopback
            self.forwarded.append(engine.forwarder.open_inward(engine.socket_maker(), self.pid, port, target))

    def _restore(self) -> None:
        """Its processes, restored from a live snapshot by CRIU on new overlays, in the cgroup
        taken for it; the holder's lifeline a new pipe of ours."""
        engine, host, store = self.engine, self.engine.host, self.engine.store
        engine.criu.require()
        if self.network is not None or self.proxies:
            raise EngineUnavailableError(
                "a sandbox restored from a live snapshot has no network yet: create it without network"
            )
        process = self.snapshot.process
        assert process is not None
        mounts: dict[str, tuple[list[str], Path, Path]] = {}
        layers = [str(store.layer_path(x)) for x in self.snapshot.layers]
        mounts["root"] = (layers, self.scratch / "u" / "root", self.scratch / "w" / "root")
        for d in self.snapshot.base.get("dirs", ()):
            lowers = [f"/{d}"] + [f"{x}/{d}" for x in layers[1:] if os.path.isdir(f"{x}/{d}")]
            mounts[d] = (lowers, self.scratch / "u" / d, self.scratch / "w" / d)
        for _, upper, work in mounts.values():
            for path in (upper, work):
                path.mkdir(parents=True)
            if host.ids is not None:  # the restored root writes its upper layer as bwrap's does
                for path in (upper, upper.parent, work, work.parent):
                    os.chown(path, *host.ids.root)

        def inside(path: Path) -> str:  # a path as the engine's mount namespace sees it (its disk's too)
            if path.is_relative_to(self.scratch):
                return self._scratch_launch + "/" + str(path.relative_to(self.scratch))
            return host.launch_path(path)

        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            with store.shared():
                images = Images(store.process_path(self.snapshot), process["digests"])
                images.check()
                self.pid = engine.criu.restore(
                    images.path,
                    helper_pid=host.userns.pid,
                    store=store.root,
                    inside=inside,
                    mounts=mounts,
                    externals=[External(*x) for x in process["externals"]],
                    pipe=int(process["pipe"]),
                    lifeline=read_end,
                    cgroups=self.cgroup.paths() if self.cgroup is not None else {},
                    pidfile=self.scratch / "pid",
                )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._lifeline = _Lifeline(self.pid, write_end)
        engine.reaper.watch(self.pid)

    # -- its state ---------------------------------------------------------------------------
    def alive(self) -> bool:
        """True while it is open and its init runs."""
        return not self._closed and self._lifeline is not None and not self._lifeline.poll()

    def check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed; create a new one")
        if self._lifeline is None or self._lifeline.poll():
            raise SandboxClosedError(f"sandbox {self.id} died (its init exited); create a new one")

    @property
    def closed(self) -> bool:
        return self._closed

    def root_fd(self) -> int:
        """An ``O_PATH`` fd of its root directory, for file operations inside."""
        self.check_open()
        return os.open(f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    # -- commands ----------------------------------------------------------------------------
    def enter_argv(self, argv: Sequence[str], cwd: str | None, env: Mapping[str, str]) -> tuple[list[str], bytes, int]:
        """The host command line that runs ``argv`` inside, in ``cwd``, with exactly ``env``
        (see :meth:`Host.enter_argv`)."""
        return self.engine.host.enter_argv(
            self.pid, argv, cwd=cwd, env=env, via=self._prlimit, networked=self.networked
        )

    def spawner(self) -> Spawner | Confined:
        """What starts its commands: filtered like its init, and in its cgroup."""
        return self._helper or self.engine.host.spawner

    def inside(self) -> Entered | None:
        """Its own command helper, inside it (the exec fast path: see ``inside.py``), started on
        first need; None where there is none to be had (commands then enter with nsenter): when
        rlimits stand in for a cgroup and its memory limit is too small for the helper to live
        under it too, or when entering failed (said once)."""
        with self._inside_lock:
            if self._inside is not None or self._inside_failed:
                return self._inside
            self.check_open()
            rlimits = rlimit_values(self.limits) if self._prlimit else []
            if any(res == resource.RLIMIT_AS and value < INSIDE_MIN_MEMORY for res, value in rlimits):
                self._inside_failed = True
                return None
            pidfd = root = -1
            try:
                pidfd = os.pidfd_open(self.pid)
                pidns = os.readlink(f"/proc/{self.pid}/ns/pid")
                signal.pidfd_send_signal(pidfd, 0)  # still the process the pidfd holds: its namespace
                root = self.root_fd()
                self._inside = self.spawner().enter(
                    pidfd,
                    root,
                    workdir=self.snapshot.workdir,
                    pidns=pidns,
                    take_root=self.engine.host.ids is not None,
                    no_net_admin=self.networked,
                    rlimits=rlimits,
                )
            except OSError as exc:
                self._inside_failed = True
                say_once(f"commands enter sandboxes with nsenter here (slower): {exc}")
            finally:
                for fd in (pidfd, root):
                    if fd >= 0:
                        os.close(fd)
            return self._inside

    def lost_inside(self, helper: Entered) -> None:
        """``helper`` (its own command helper) is gone: commands enter with nsenter from now on."""
        with self._inside_lock:
            if self._inside is helper:
                self._inside, self._inside_failed = None, True
        helper.close(wait=0)

    # -- freezing ----------------------------------------------------------------------------
    def freeze(self, record: Callable[[tuple[str, ...]], Snapshot]) -> Snapshot:
        """A snapshot of its files now (``record`` makes it of its layers), the processes paused
        meanwhile."""
        self.check_open()
        host = self.engine.host
        return freeze(
            self.engine.store, self.scratch, self.pid, self.cgroup, self.snapshot.layers, host.needs_squash, record
        )

    def checkpoint(self, record: Callable[[tuple[str, ...], dict[str, Any]], Snapshot]) -> Snapshot:
        """A live snapshot: its files and its processes (memory, open files, sockets between
        them) of one instant, the sandbox running on; ``record`` makes it of its layers and of
        what a restore needs."""
        self.check_open()
        engine, store = self.engine, self.engine.store
        engine.criu.require()
        if self.networked:
            raise EngineUnavailableError(
                "a live snapshot cannot keep a networked sandbox yet (its uplink runs outside it): create the "
                "sandbox without network for live snapshots, or take a snapshot of its files"
            )
        assert self._lifeline is not None
        try:
            mountinfo = Path(f"/proc/{self.pid}/mountinfo").read_text()
        except OSError as exc:
            raise SandboxClosedError(f"sandbox {self.id} died (its init exited); create a new one") from exc
        externals, skipped = externals_of(mountinfo, self.snapshot.base.get("dirs", ()))
        tmp = store.tmp_dir()
        images = tmp / "images"

        def copy() -> None:  # while every process is frozen: the files of the same instant as the memory
            copy_upper(self.scratch, tmp / "layer")

        try:
            try:
                engine.criu.dump(self.pid, images, externals=externals, skip=skipped, while_frozen=copy)
            except SnapshotError as exc:
                holders = lock_holders(self.pid) if "file locks" in str(exc) else ""
                if holders:
                    raise SnapshotError(f"{exc} Held by: {holders}; release the lock before the snapshot") from exc
                raise
            assert engine.host.ids is not None  # live snapshots are root's (Criu.require)
            sealed = Images.seal(images, engine.host.ids.gid_base)
            process = {
                "pipe": self._lifeline.inode,
                "externals": [e.to_json() for e in externals],
                "digests": sealed.digests,
                "criu": engine.criu.version,
            }

            def with_process(layers: tuple[str, ...]) -> Snapshot:
                snap = record(layers, process)
                store.put_process(snap.key, images)  # before its record: a record always has its images
                Images(store.process_path(snap.key), sealed.digests).remember()
                return snap

            return publish(store, tmp, self.snapshot.layers, engine.host.needs_squash, with_process)
        finally:
            rmtree(tmp)

    # -- its end -----------------------------------------------------------------------------
    def _kill(self) -> None:
        """End it at once: its init killed (the kernel kills the rest of its pid namespace)."""
        if self._lifeline is not None:
            self._lifeline.kill()
            self._lifeline.cut()
        elif self.pid:  # started, its lifeline not made yet: its pid is still its own
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill every process in it and delete its writable layer (in the background). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for exp in self.forwarded:
            with contextlib.suppress(Exception):
                exp.close()
        with self._inside_lock:
            if self._inside is not None:
                self._inside.stop()
        self._kill()
        if self.uplink is not None:
            self.uplink.close()
        self.engine.store.discard(self.dir, wait_for=self._lifeline, then=self._release)

    def _release(self) -> None:
        """What it holds outside its directory: its uplink, helpers, cgroup and disk."""
        if self.uplink is not None:
            self.uplink.wait()
        with self._inside_lock:
            inside, self._inside, self._inside_failed = self._inside, None, True
        if inside is not None:  # first: it holds the sandbox's mounts (its disk's too)
            inside.close()
        if self._helper is not None:
            self._helper.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.disk is not None:
            self.disk.release()
