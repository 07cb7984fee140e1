"""One cgroup per sandbox, for its limits (memory, pids, cpu) and for freezing it.

cgroup v1 (one hierarchy per controller, as on this project's CI machines) and v2 (the unified
hierarchy most current distributions use) are both handled. As root, sandboxes live below the
runner's own cgroup (per controller on v1), so whatever caps the job (a CI runner's memory or task
limit, a systemd unit's) caps them too; rootless, v2 is used below the cgroup systemd delegates to
the user's session (``user@UID.service``), where there is one. Below that:
``pytest-sandbox/<store>/run-<run>/<owner>/<sandbox>``: ``<store>`` names the cache directory
(another cache on this host judges its own owners), ``<run>`` the test run (all its xdist
workers; its memory cap, ``--sandbox-max-memory``, holds all their sandboxes together),
``<owner>`` the owner token of the process, so ``gc`` finds what a crashed process left and
removes it (also where earlier versions put them: ``pytest-sandbox/<store>/<owner>`` at the
hierarchy's root). Where no cgroup can be made (rootless without a delegated cgroup), the engine
falls back to rlimits for what they can cover and says what is not enforced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..types import Limits, LimitStatus

__all__ = ["CGROUP_ROOT", "Cgroup", "Cgroups", "oom_kill_count"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "pytest-sandbox"
RUNNER = "pytest-sandbox.runner"
"""Where, on v2, the processes of the runner's own cgroup move when sandboxes nest below it: a
cgroup that passes controllers to its children may hold no processes itself."""
RUN = "run-"
_V1 = ("memory", "pids", "cpu", "freezer")
_PERIOD = 100_000  # CFS period in microseconds: cpus=1.5 is 150 ms of CPU time every 100 ms


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroups:
    """This machine's cgroup setup, as far as this process may use it."""

    def __init__(
        self,
        group: str,
        root: Path = CGROUP_ROOT,
        own: str | None = None,
        *,
        own_v1: dict[str, str] | None = None,
        run: str = "",
        max_memory: int | None = None,
    ) -> None:
        self.group = group
        # This process's cgroup (v2, and per controller on v1): as root sandboxes nest below it;
        # rootless, a user's delegated subtree is found above it.
        self._own = own if own is not None else _own_cgroup()
        self._own_v1 = own_v1 if own_v1 is not None else _own_v1_cgroups()
        self._root = root
        self._run = RUN + (run or "0")
        self._wanted: set[str] = set()
        self.version = 0
        self.dirs: dict[str, Path] = {}  # controller -> the run's directory, owners below it
        self.groups: dict[str, Path] = {}  # controller -> this cache's directory, runs below it
        self.reason = ""
        self.cap_reason = ""  # why max_memory is not held, when it is not
        try:
            self._detect(root)
        except OSError as exc:
            self.version, self.dirs, self.reason = 0, {}, f"cgroups cannot be used here ({exc.strerror})"
        if max_memory is not None:
            self._cap_run(max_memory)

    def _detect(self, root: Path) -> None:
        if (root / "cgroup.controllers").is_file():  # pure v2
            self._v2(root)
            return
        v1 = {c: root / c for c in _V1 if (root / c / "cgroup.procs").is_file()}
        if not v1:
            self.reason = "no cgroup hierarchy is mounted at /sys/fs/cgroup"
            return
        for c, d in v1.items():
            base = d.joinpath(*_parts(self._own_v1.get(c, "/"))) if os.geteuid() == 0 else d
            if not base.is_dir():  # our cgroup as another namespace names it: not ours to nest in
                base = d
            group = base / PARENT / self.group
            run = group / self._run
            run.mkdir(parents=True, exist_ok=True)  # PermissionError as a plain user: no cgroups
            self.groups[c], self.dirs[c] = group, run
        self.version = 1

    def _v2(self, root: Path) -> None:
        base = self._nest_v2(root) if os.geteuid() == 0 else self._delegated(root)
        if base is None:
            self.reason = (
                "rootless, and no cgroup is delegated to this user (a systemd user session delegates one: "
                "log in through it, or run under `systemd-run --user --scope`)"
            )
            return
        group = base / PARENT / self.group
        run = group / self._run
        run.mkdir(parents=True, exist_ok=True)
        self._wanted = {"memory", "pids", "cpu"} & set((base / "cgroup.controllers").read_text().split())
        try:
            _enable(base, self._wanted)
        except OSError as exc:
            if exc.errno != errno.EBUSY or base == root:
                raise
            _evacuate(base)  # it holds processes (ours among them): they move to a leaf of its own
            _enable(base, self._wanted)
        for d in (base / PARENT, group, run):
            _enable(d, self._wanted)
        self.groups, self.dirs = {"unified": group}, {"unified": run}
        self.version = 2

    def _nest_v2(self, root: Path) -> Path:
        """Root's place for sandboxes on v2: this process's own cgroup (the parent of the leaf it
        was moved to, when an earlier runner of the job moved it)."""
        parts = _parts(self._own)
        if parts and parts[-1] == RUNNER:
            parts = parts[:-1]
        base = root.joinpath(*parts)
        return base if base.is_dir() else root

    def _cap_run(self, limit: int) -> None:
        """The memory of all the run's sandboxes together: at most ``limit`` bytes."""
        run = self.dirs.get("unified" if self.version == 2 else "memory")
        f = None if run is None else run / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")
        if f is None or not f.exists():
            self.cap_reason = self.reason or "the memory controller is not available to our cgroups"
            return
        try:
            _write(f, str(limit))
        except OSError as exc:
            self.cap_reason = f"its cgroup takes no limit ({exc.strerror})"

    def _delegated(self, root: Path) -> Path | None:
        """The highest cgroup above this process's that this user owns and may divide: systemd
        delegates ``user@UID.service`` to a user session. Our own cgroup holds processes, so the
        sandboxes go below an ancestor that holds none (v2 lets no cgroup have both)."""
        parts = [p for p in self._own.split("/") if p]
        uid = os.geteuid()
        for depth in range(1, len(parts)):  # the highest first; never our own leaf
            d = root.joinpath(*parts[:depth])
            with contextlib.suppress(OSError):
                if d.stat().st_uid == uid and os.access(d / "cgroup.subtree_control", os.W_OK):
                    return d
        return None

    @property
    def usable(self) -> bool:
        return self.version != 0

    @property
    def controllers(self) -> set[str]:
        """The controllers sandboxes' cgroups get (``freezer`` on v1 included)."""
        return set(self._wanted) if self.version == 2 else set(self.dirs)

    def create(self, owner: str, name: str) -> Cgroup:
        """A new, empty cgroup for one sandbox."""
        cg = Cgroup(self.version, {c: d / owner / name for c, d in self.dirs.items()})
        for d in cg.dirs.values():
            d.mkdir(parents=True)
            if self.version == 2:  # v2: a controller reaches a child only if every parent passes it on
                _enable(d.parent.parent, self._wanted)
                _enable(d.parent, self._wanted)
        if self.version == 1 and "memory" in cg.dirs:
            with contextlib.suppress(OSError):  # v1's default lets the OOM killer choose outside
                _write(cg.dirs["memory"] / "memory.use_hierarchy", "1")
        return cg

    def release(self, owner: str) -> None:
        """Remove ``owner``'s directory once its sandboxes' cgroups are gone (a clean close), and
        the run's and this cache's directories when no other owner uses them (a later create()
        makes them again)."""
        for c, d in self.dirs.items():
            for gone in (d / owner, d, self.groups[c]):
                with contextlib.suppress(OSError):
                    gone.rmdir()

    def _places(self) -> list[dict[str, Path]]:
        """This cache's directories per controller: below this process's cgroup, and where
        earlier versions (and runners in other cgroups of the machine's root) put them."""
        old = {c: (self._root if self.version == 2 else self._root / c) / PARENT / self.group for c in self.groups}
        return [self.groups] + ([old] if old != self.groups else [])

    def gc(self, alive: Callable[[str], bool]) -> int:
        """Remove the cgroups of owners that are gone (``alive(owner)`` false); returns how many."""
        removed = 0
        for groups in self._places():
            owners: dict[str, dict[str, Path]] = {}  # owner (under its run) -> controller -> its directory
            for c, group in groups.items():
                for child in _subdirs(group):
                    for owner in _subdirs(child) if child.name.startswith(RUN) else [child]:
                        owners.setdefault(str(owner.relative_to(group)), {})[c] = owner
            for where, dirs in owners.items():
                if alive(where.rpartition("/")[2]):
                    continue
                names = {p.name for d in dirs.values() for p in _subdirs(d)}
                for name in names:
                    Cgroup(self.version, {c: d / name for c, d in dirs.items()}).remove()
                    removed += 1
                for d in dirs.values():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            for group in groups.values():  # runs nobody uses any more
                for child in _subdirs(group):
                    if child.name.startswith(RUN):
                        with contextlib.suppress(OSError):
                            child.rmdir()
        return removed


def oom_kill_count(path: Path) -> int | None:
    """The ``oom_kill`` counter of a memory cgroup's ``memory.oom_control`` (v1) or
    ``memory.events`` (v2), or None where the file cannot be read."""
    try:  # read at every exec as root: the plainest read there is
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    for line in data.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key == b"oom_kill":
            return int(value)
    return 0


def _subdirs(d: Path) -> list[Path]:
    try:
        return [p for p in d.iterdir() if p.is_dir()]
    except OSError:
        return []


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != ".."]


def _own_v1_cgroups() -> dict[str, str]:
    """This process's cgroup in each v1 hierarchy (``4:memory:/job`` in /proc/self/cgroup)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                if c:
                    out[c] = path
    return out


def _evacuate(d: Path) -> None:
    """Move every process of cgroup ``d`` to its leaf :data:`RUNNER` (the caps of ``d`` still
    hold them), so that ``d`` may pass controllers to the sandboxes' cgroups: what container
    engines do for the cgroup they start in."""
    leaf = d / RUNNER
    leaf.mkdir(exist_ok=True)
    for _ in range(10):  # processes forked meanwhile are moved in the next round
        pids = (d / "cgroup.procs").read_text().split()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, OSError):
                _write(leaf / "cgroup.procs", pid)


def _own_cgroup() -> str:
    """This process's cgroup v2 path (``0::/user.slice/...`` in /proc/self/cgroup), or ""."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    return ""


def _enable(d: Path, controllers: set[str]) -> None:
    try:
        on = set((d / "cgroup.subtree_control").read_text().split())
    except FileNotFoundError:  # a cgroup just made shows its files at once; a plain directory not
        on = set()
    missing = controllers - on
    if missing:
        _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)))


class Cgroup:
    """The cgroup of one sandbox: every process of the sandbox is in it."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs

    def _file(self, controller: str, v1_name: str, v2_name: str) -> Path | None:
        if self.version == 2:
            return self.dirs["unified"] / v2_name
        d = self.dirs.get(controller)
        return None if d is None else d / v1_name

    def paths(self) -> dict[str, str]:
        """Its path in each hierarchy, from that hierarchy's root (``unified``: v2's)."""
        out = {}
        for controller, d in self.dirs.items():
            top = CGROUP_ROOT if controller == "unified" else CGROUP_ROOT / controller
            out[controller] = "/" + str(d.relative_to(top)) if d.is_relative_to(top) else str(d)
        return out

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files a process joins by writing its pid to them."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def adopt(self, pids: list[int]) -> None:
        """Move ``pids`` (processes not born in the cgroup: the sandbox's init and holder) into it."""
        for f in self.procs:
            for pid in pids:
                _write(Path(f), str(pid))

    def apply(self, limits: Limits) -> dict[str, LimitStatus]:
        """Set ``limits``; returns how each is held. A limit whose controller this cgroup lacks
        (v2 without it delegated or enabled, v1 without it mounted) is left out: the caller
        says it is not enforced."""
        kind = f"cgroup v{self.version}"
        out: dict[str, LimitStatus] = {}
        mem = limits.memory_bytes
        limit_file = self._file("memory", "memory.limit_in_bytes", "memory.max")
        if mem is not None and limit_file is not None and limit_file.exists():
            _write(limit_file, str(mem))
            # Without swap accounting the swap files do not exist; swap then extends the limit.
            swap = self._file("memory", "memory.memsw.limit_in_bytes", "memory.swap.max")
            with contextlib.suppress(OSError):
                if swap is not None:
                    _write(swap, "0" if self.version == 2 else str(mem))
            out["memory"] = LimitStatus("memory", mem, True, f"{kind} memory")
        pids_file = self._file("pids", "pids.max", "pids.max")
        if limits.pids is not None and pids_file is not None and pids_file.exists():
            _write(pids_file, str(limits.pids))
            out["pids"] = LimitStatus("pids", limits.pids, True, f"{kind} pids")
        cpu_file = self._file("cpu", "cpu.cfs_quota_us", "cpu.max")
        if limits.cpus is not None and cpu_file is not None and cpu_file.exists():
            quota = max(1000, int(limits.cpus * _PERIOD))
            if self.version == 2:
                _write(cpu_file, f"{quota} {_PERIOD}")
            else:
                _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(_PERIOD))
                _write(cpu_file, str(quota))
            out["cpus"] = LimitStatus("cpus", limits.cpus, True, f"{kind} cpu")
        return out

    def oom_kills(self) -> int:
        """How many processes the kernel killed here for want of memory, so far."""
        f = self._file("memory", "memory.oom_control", "memory.events")
        return (oom_kill_count(f) or 0) if f is not None else 0

    @contextlib.contextmanager
    def frozen(self, settle: float = 0.01) -> Iterator[bool]:
        """Freeze every process of the sandbox for the block (the kernel stops them all at once,
        including ones forked meanwhile). Yields False, thawed, when this cgroup cannot freeze or
        does not get there within ``settle`` seconds (v1 can stay FREEZING while a task is caught
        in a vfork): the caller then pauses another way."""
        done: Callable[[], bool]
        if self.version == 2:
            state, events = self.dirs["unified"] / "cgroup.freeze", self.dirs["unified"] / "cgroup.events"
            on, off = "1", "0"

            def done() -> bool:
                return "frozen 1" in events.read_text()

        elif "freezer" in self.dirs:
            state = self.dirs["freezer"] / "freezer.state"
            on, off = "FROZEN", "THAWED"

            def done() -> bool:
                return state.read_text().strip() == "FROZEN"

        else:
            yield False
            return
        try:
            _write(state, on)
        except OSError:
            yield False
            return
        try:
            end = time.monotonic() + settle
            while not (ok := done()) and time.monotonic() < end:
                time.sleep(0.0002)
        except BaseException:
            with contextlib.suppress(OSError):
                _write(state, off)
            raise
        if not ok:
            with contextlib.suppress(OSError):
                _write(state, off)
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                _write(state, off)

    def _tree(self) -> list[Path]:
        """Every directory of the cgroup in every hierarchy, the deepest first. A sandbox's
        cgroup can have cgroups below it: CRIU restores a live snapshot's processes into the
        path they had below their cgroup namespace's root, made below the fork's cgroup (v1's
        memory hierarchy here). Those are the sandbox's too."""
        out: list[Path] = []
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                out += [Path(top) for top, _, _ in os.walk(d, topdown=False)]
        return out

    def pids(self) -> list[int]:
        """Processes in the cgroup, or in a cgroup below it, now."""
        found: set[int] = set()
        for d in self._tree():
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill whatever still runs in the cgroup and delete it."""
        end = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            if self.version == 2:
                _write(self.dirs["unified"] / "cgroup.kill", "1")
        while True:
            left = self.pids()
            if not left or time.monotonic() > end:
                break
            # A frozen process cannot die: thaw first (v1), then kill.
            with contextlib.suppress(OSError):
                if "freezer" in self.dirs:
                    _write(self.dirs["freezer"] / "freezer.state", "THAWED")
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        for d in self._tree():  # the cgroups below first: a cgroup with children cannot go
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)  # the last process is still being torn down
