"""The snapshot store: layers and snapshot records on disk, with the locks that keep it consistent.

Layout under the cache directory (short names on purpose: overlayfs takes every layer path in
one mount option string limited to a page, so deep snapshot chains need short paths)::

    CACHEDIR.TAG
    v2/                 private to its owner (no access for other users; see the security model)
    v2/l/<id>/          immutable layer trees
    v2/i/<id>.json      what each layer held when it was published (written last; checked on use)
    v2/s/<key>.json     snapshot records (layers, env, workdir, parent)
    v2/t/<owner>.<id>   work in progress; published with an atomic rename
    v2/r/<id>/          live sandboxes: writable layer, overlay work dir, meta.json
    v2/k/<key>.lock     one build lock per setup key (filelock; never deleted, see filelock #574)
    v2/o/<owner>.lock   held by each live process; a free one means its owner died
    v2/p/<key>/         a live snapshot's process images (memory: private to the runner, like all)
    v2/gc.lock          shared by writers, exclusive for garbage collection

Core module: no pytest import.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from ._hostfs import DIR_FLAGS, TreeWalk, rmtree_at
from ._lifeline import end_processes_using
from .errors import ConfigError, SnapshotNotFoundError
from .types import Snapshot

__all__ = ["STORE_FORMAT", "LayerCheck", "Store", "default_cache_dir", "match_snapshot", "valid_key"]

STORE_FORMAT = 2
# How long a sweep that may be skipped (a session's own, at its start or end) waits for another
# process's publishing or pulling (which can hold the shared lock for a whole download) to end.
GC_GRACE = 2.0
"""The on-disk layout's version: 2 made the store private and layers owned by the sandbox id range."""

CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by pytest-sandbox.\n"
    "# For information about cache directory tags, see https://bford.info/cachedir/\n"
)


def default_cache_dir() -> Path:
    """``$PYTEST_SANDBOX_CACHE``, else ``$XDG_CACHE_HOME/pytest-sandbox``, else ~/.cache/..."""
    env = os.environ.get("PYTEST_SANDBOX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pytest-sandbox"


def new_id(n: int = 5) -> str:
    """A short random id (2n hex characters)."""
    return secrets.token_hex(n)


def match_snapshot(ref: str, snaps: list[Snapshot], where: str) -> Snapshot:
    """The snapshot named ``ref``, else the one whose key starts with it (4+ characters)."""
    named = [s for s in snaps if s.name == ref]
    if named:
        return named[-1]
    matches = [s for s in snaps if len(ref) >= 4 and s.key.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SnapshotNotFoundError(f"{ref!r} matches {len(matches)} snapshots; give more characters of the key")
    raise SnapshotNotFoundError(f"no snapshot {ref!r} in {where}; `pytest-sandbox ls` lists the ones there are")


def valid_key(key: object) -> bool:
    """Whether ``key`` may name a snapshot: it becomes a file name in the store (s/, k/), so it
    is one path component, not hidden, and has no NUL."""
    return isinstance(key, str) and bool(key) and "/" not in key and "\0" not in key and not key.startswith(".")


def _checked_key(key: str) -> str:
    if not valid_key(key):
        raise ConfigError(f"snapshot key {key!r} is not valid: a key is one file name (no '/', not starting with '.')")
    return key


def rmtree(path: Path) -> None:
    """Remove a tree of any depth, even where a sandbox left directories without permissions."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(st.st_mode):
            path.unlink()
            return
        pfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rmtree_at(pfd, path.name)
        finally:
            os.close(pfd)
    except FileNotFoundError:
        pass


def _lock_within(fd: int, mode: int, within: float | None) -> bool:
    """flock ``fd`` in ``mode``: waiting as long as it takes (``within`` None), or up to
    ``within`` seconds, then False."""
    if within is None:
        fcntl.flock(fd, mode)
        return True
    end = time.monotonic() + within
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)


def _drop(path: Path, failed: list[str]) -> int:
    """Remove one tree for gc: 1 when it went; else 0, and why in ``failed`` (one damaged
    entry must not stop the collection of the rest)."""
    try:
        rmtree(path)
    except OSError as exc:
        failed.append(f"{path}: {exc.strerror or exc}")
        return 0
    return 1


def format_age(seconds: float) -> str:
    """A short age like 45s, 3m, 2h, 5d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def format_size(n: float) -> str:
    """A short size like 512B, 3.2K, 41.0M, 1.5G."""
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def disk_usage(path: Path) -> int:
    """Bytes allocated below ``path`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in _entries(path):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _entries(path: Path) -> Iterator[os.stat_result]:
    """``lstat`` of every entry below ``path``, at any depth; a directory that cannot be read is
    counted but not entered (as ``os.walk`` does)."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        walk = TreeWalk(top)
        try:
            for name, st in walk:
                if st is not None:
                    yield st
                    if stat.S_ISDIR(st.st_mode):
                        with contextlib.suppress(PermissionError):
                            walk.enter(name)
        finally:
            walk.close()
    finally:
        os.close(top)


def write_atomic(path: Path, text: str) -> None:
    """Write a file by renaming a finished temporary over it: readers see the old content or the
    new one, never half."""
    tmp = path.with_name(f".{path.name}.{new_id()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def owner_alive_in(root: Path, token: str | None) -> bool:
    """True while the process holding owner ``token`` of the store at ``root`` runs. A store that
    is gone has no live owners; one this user may not read is taken as alive (not ours to judge)."""
    if token is None:
        return False
    path = root / "o" / f"{token}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Held: by the owner, or for a moment by a child it forked just before it died (between
        # fork and exec a child shares the lock). The pid the owner wrote settles it.
        with contextlib.suppress(OSError, ValueError):
            pid, _, ns = os.pread(fd, 200, 0).decode().strip().partition(" ")
            if ns == _pid_namespace() and not os.path.exists(f"/proc/{int(pid)}"):
                return False
        return True
    finally:
        os.close(fd)
    return False


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


@dataclass(frozen=True)
class LayerCheck:
    """What a layer holds, in brief: its top-level names, how many entries and bytes below."""

    top: tuple[str, ...]
    entries: int
    size: int

    @staticmethod
    def top_of(path: Path) -> tuple[str, ...]:
        return tuple(sorted(os.listdir(path)))

    @classmethod
    def of(cls, path: Path) -> LayerCheck:
        entries = size = 0
        for st in _entries(path):
            entries += 1
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
        return cls(cls.top_of(path), entries, size)

    def to_json(self) -> dict[str, Any]:
        return {"top": list(self.top), "entries": self.entries, "size": self.size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerCheck:
        return cls(tuple(data["top"]), int(data["entries"]), int(data["size"]))


_MAX_LINKS = 40  # as the kernel's own path walk


class _Untrusted(Exception):
    """A directory on the way to the cache that another user controls."""


def _owners(uid: int) -> set[int]:
    """Who may own the directories on the way to a cache: root and ``uid``; inside a user
    namespace also the overflow uid, which is how every unmapped owner (the host's root among
    them) shows there: who it is cannot be told, so the modes must say no one else writes."""
    owners = {0, uid}
    with contextlib.suppress(OSError, ValueError):
        if Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]:
            owners.add(int(Path("/proc/sys/kernel/overflowuid").read_text()))
    return owners


def _trusted(st: os.stat_result, owners: set[int]) -> bool:
    """A directory (or link) that only ``owners`` can change: owned by one of them, and writable
    by no one else unless sticky (there others can make entries, but not replace ours, whose
    owner is checked in turn)."""
    return st.st_uid in owners and (not st.st_mode & 0o022 or bool(st.st_mode & stat.S_ISVTX))


def private_dir(path: Path) -> int:
    """An fd of directory ``path`` (absolute), made where missing (0700), reached through
    directories that only root and this user can change (:func:`_trusted`): another user who
    could swap a component for a symlink would have root write, chmod and chown where they
    chose. Symlinks on the way are followed only where they sit in such a directory. The walk
    never follows a link it has not checked."""
    owners = _owners(os.geteuid())
    todo = [p for p in str(path).split("/") if p not in ("", ".")][::-1]
    fd = os.open("/", DIR_FLAGS)
    links = 0
    try:
        if not _trusted(os.fstat(fd), owners):
            raise _Untrusted("/")
        where = Path("/")
        while todo:
            name = todo.pop()
            if name == "..":  # where is the real path walked so far: walk its parent again from /
                todo.extend(p for p in str(where.parent).split("/")[::-1] if p)
                os.close(fd)
                fd, where = os.open("/", DIR_FLAGS), Path("/")
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                # Another process opening the same new cache may make it first: go on with theirs.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if st.st_uid not in owners:
                raise _Untrusted(str(where / name))
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise _Untrusted(f"{where / name} (links that loop)")
                target = os.readlink(name, dir_fd=fd)
                todo.extend(p for p in target.split("/")[::-1] if p not in ("", "."))
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = os.open("/", DIR_FLAGS), Path("/")
                continue
            nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd, where = nfd, where / name
            if not _trusted(os.fstat(fd), owners):
                raise _Untrusted(str(where))
        return fd
    except BaseException:
        os.close(fd)
        raise


class Store:
    """Snapshot records and layers under one cache directory, safe for many processes at once."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache_dir = Path(os.path.abspath(self.cache_dir))
        self.root = self.cache_dir / f"v{STORE_FORMAT}"
        try:
            top = private_dir(self.cache_dir)
        except _Untrusted as exc:
            raise ConfigError(
                f"cache directory {self.cache_dir} is reached through {exc}, which another user controls: they could "
                "point it at files of yours. Use a cache directory below your own home (PYTEST_SANDBOX_CACHE or "
                "--sandbox-cache-dir), or one in a directory only you (and root) can change."
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot use cache directory {self.cache_dir}: {exc}. Point PYTEST_SANDBOX_CACHE "
                "(or --sandbox-cache-dir) at a writable directory."
            ) from exc
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.root.name, 0o700, dir_fd=top)
            root = os.open(self.root.name, DIR_FLAGS, dir_fd=top)
            try:
                st = os.fstat(root)
                if st.st_uid != os.geteuid():
                    raise ConfigError(
                        f"cache directory {self.root} is not owned by the current user (uid {os.geteuid()}); "
                        "use a cache directory of your own (PYTEST_SANDBOX_CACHE or --sandbox-cache-dir)"
                    )
                if st.st_mode & 0o007:  # other users must never reach a sandbox's files (setuid ones included)
                    os.fchmod(root, stat.S_IMODE(st.st_mode) & ~0o077)
                for sub in ("l", "i", "s", "t", "r", "k", "o", "p"):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(sub, 0o700, dir_fd=root)
                    os.close(os.open(sub, DIR_FLAGS, dir_fd=root))  # a directory, not a link planted there
            finally:
                os.close(root)
            with contextlib.suppress(FileExistsError):
                tag = os.open(
                    "CACHEDIR.TAG",
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=top,
                )
                with os.fdopen(tag, "w") as f:
                    f.write(CACHEDIR_TAG)
        except OSError as exc:
            raise ConfigError(
                f"cannot use cache directory {self.cache_dir}: {exc}. Point PYTEST_SANDBOX_CACHE "
                "(or --sandbox-cache-dir) at a writable directory."
            ) from exc
        finally:
            os.close(top)
        self._owner: str | None = None
        self._owner_fd: int | None = None
        self._lock = threading.Lock()
        self._pending: list[threading.Thread] = []

    # -- ownership ---------------------------------------------------------------------------
    @property
    def owner(self) -> str:
        """This process's owner token. Its lock file is held for as long as the process lives."""
        with self._lock:
            if self._owner is None or self._owner_fd is None:
                token = new_id(4)
                fd = os.open(self.root / "o" / f"{token}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, f"{os.getpid()} {_pid_namespace()}\n".encode())
                self._owner, self._owner_fd = token, fd
            return self._owner

    def owner_alive(self, token: str | None, store: str | None = None) -> bool:
        """True while the process that holds ``token`` is running (or the token is ours).

        ``store`` is the root of the store that made the token, when it may be another cache
        directory on this host (remote sandboxes carry it as a label): owners are judged there.
        """
        if store and store != str(self.root):
            return owner_alive_in(Path(store), token)
        if token is not None and token == self._owner:
            return True
        return owner_alive_in(self.root, token)

    # -- locks -------------------------------------------------------------------------------
    def build_lock(self, key: str) -> filelock.FileLock:
        """The lock that makes N processes racing for ``key`` build it exactly once."""
        return filelock.FileLock(str(self.root / "k" / f"{_checked_key(key)}.lock"))

    @contextlib.contextmanager
    def _flock(self, mode: int, within: float | None = None) -> Iterator[bool]:
        """Hold the gc lock in ``mode``; with ``within``, give up after that many seconds
        (yields False, unlocked)."""
        fd = os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            yield _lock_within(fd, mode, within)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Held while publishing layers or registering a sandbox: gc cannot run meanwhile."""
        with self._flock(fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held by garbage collection, so it never deletes what a writer is about to reference."""
        with self._flock(fcntl.LOCK_EX):
            yield

    # -- paths -------------------------------------------------------------------------------
    def layer_path(self, layer: str) -> Path:
        return self.root / "l" / layer

    def tmp_dir(self) -> Path:
        """A fresh work-in-progress directory, named after this process so gc can find strays."""
        p = self.root / "t" / f"{self.owner}.{new_id()}"
        p.mkdir()
        return p

    def publish_layer(self, tmp: Path, layer: str | None = None) -> str:
        """Move a finished tree into the layer store (atomic rename) and return its id.

        Call with :meth:`shared` held, together with the :meth:`put` that references it.
        """
        layer = layer or new_id()
        check = LayerCheck.of(tmp)
        os.rename(tmp, self.layer_path(layer))
        write_atomic(self._manifest(layer), json.dumps(check.to_json()))
        return layer

    def _manifest(self, layer: str) -> Path:
        return self.root / "i" / f"{layer}.json"

    def layer_ok(self, layer: str, full: bool = False) -> bool:
        """True when ``layer`` holds what it held when published.

        The quick check (every use) needs the record written after the publish, and the same
        top-level entries; ``full=True`` counts every file and byte (``pytest-sandbox verify``).
        """
        try:
            want = LayerCheck.from_json(json.loads(self._manifest(layer).read_text()))
            if full:
                return LayerCheck.of(self.layer_path(layer)) == want
            return want.top == LayerCheck.top_of(self.layer_path(layer))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def forget_layer(self, layer: str) -> None:
        """Mark a damaged layer as absent (its record goes; gc deletes the tree once unused)."""
        with contextlib.suppress(FileNotFoundError):
            self._manifest(layer).unlink()

    def layers(self) -> list[str]:
        """Every layer id in the store."""
        return sorted(p.name for p in (self.root / "l").iterdir())

    # -- records -----------------------------------------------------------------------------
    def _record(self, key: str) -> Path:
        return self.root / "s" / f"{_checked_key(key)}.json"

    def _read(self, key: str) -> Snapshot | None:
        """The record of ``key`` as written, its layers unchecked."""
        try:
            return Snapshot.from_json(json.loads(self._record(key).read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _records(self) -> list[Snapshot]:
        """Every record as written. What gc keeps or drops is decided on these, not on
        :meth:`all`: a record with a damaged layer still holds its other layers until it goes, and
        checking every layer of every record made each removal cost seconds in a big cache."""
        out = []
        for p in (self.root / "s").glob("*.json"):
            snap = self._read(p.stem)
            if snap is not None:
                out.append(snap)
        return out

    def get(self, key: str) -> Snapshot | None:
        snap = self._read(key)
        # A record whose layers vanished or were damaged (an interrupted copy, a clean-up by hand)
        # is treated as absent, so the recipe is built again: never used silently.
        if snap is None or not all(self.layer_ok(layer) for layer in snap.layers):
            return None
        return snap

    def put(self, snap: Snapshot) -> None:
        """Write a record atomically: readers see the old record or the new one, never half."""
        write_atomic(self._record(snap.key), json.dumps(snap.to_json(), indent=1))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._record(key).unlink()

    def process_path(self, snap: Snapshot | str) -> Path:
        """Where the process images of a live snapshot (or of key ``snap``) are: a snapshot that
        only adds environment to a live one keeps its parent's images."""
        if isinstance(snap, Snapshot):
            snap = str((snap.process or {}).get("images") or snap.key)
        return self.root / "p" / _checked_key(snap)

    def put_process(self, key: str, images: Path) -> None:
        """Move a checkpoint's images (a directory in this store) to live snapshot ``key``'s place
        (call with :meth:`shared` held, before the record)."""
        dest = self.process_path(key)
        rmtree(dest)  # a record written before, and lost: its images are not this one's
        os.rename(images, dest)

    def all(self) -> list[Snapshot]:
        out = []
        for p in (self.root / "s").glob("*.json"):
            snap = self.get(p.stem)
            if snap is not None:
                out.append(snap)
        return sorted(out, key=lambda s: s.created)

    def find(self, ref: str) -> Snapshot:
        """A snapshot by key, unique key prefix (4+ characters) or name."""
        exact = self.get(ref) if "/" not in ref else None
        return exact or match_snapshot(ref, self.all(), where=str(self.cache_dir))

    # -- live sandboxes ----------------------------------------------------------------------
    def register_sandbox(self, sid: str, meta: dict[str, Any]) -> Path:
        """Create a sandbox's directory and meta (call with :meth:`shared` held)."""
        d = self.root / "r" / sid
        d.mkdir()
        self.set_sandbox_meta(d, meta)
        return d

    def set_sandbox_meta(self, d: Path, meta: dict[str, Any]) -> None:
        """Write what a sandbox directory holds (its layers, which gc then keeps), ours."""
        write_atomic(d / "meta.json", json.dumps({**meta, "owner": self.owner}))

    def sandboxes(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for d in (self.root / "r").iterdir():
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                meta = {}
            out.append((d, meta))
        return out

    def discard(self, path: Path, wait_for: Any = None, then: Callable[[], None] | None = None) -> None:
        """Remove a tree without making the caller wait: in a background thread, first wait for
        ``wait_for`` (a process still using the tree), then rename it into t/ and delete it.

        A crash before the deletion finishes leaves the tree in t/ (or r/) under our owner token,
        where the next gc finds it. :meth:`flush` waits for every pending removal.
        """

        def work() -> None:
            if wait_for is not None:
                with contextlib.suppress(Exception):
                    wait_for.wait()
            if then is not None:
                with contextlib.suppress(Exception):
                    then()
            trash = self.root / "t" / f"{self.owner}.x{new_id()}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
            rmtree(trash)

        t = threading.Thread(target=work, daemon=True, name="sandbox-discard")
        with self._lock:
            self._pending = [x for x in self._pending if x.is_alive()]
            self._pending.append(t)
        try:
            t.start()
        except RuntimeError:  # no thread to be had (the user's process limit): here, then
            with self._lock:
                self._pending.remove(t)
            work()

    def flush(self) -> None:
        """Wait until every removal started by :meth:`discard` has finished."""
        with self._lock:
            pending = list(self._pending)
        for t in pending:
            t.join()

    # -- garbage collection ------------------------------------------------------------------
    def gc(self, aliases: Callable[[Path], list[str]] | None = None, *, wait: bool = True) -> int:
        """Remove what dead processes left behind: sandboxes, work in progress, their ephemeral
        snapshots, and layers nothing references. Returns the number of items removed.

        ``aliases`` gives the other names a sandbox directory has in the processes using it (the
        local engine's, as root, see the store at another path). With ``wait=False`` the sweep is
        skipped (0) when another process publishes or pulls for more than :data:`GC_GRACE`
        seconds: a session's own sweep must not wait out someone else's download."""
        with self._flock(fcntl.LOCK_EX, within=None if wait else GC_GRACE) as locked:
            return self._gc(aliases) if locked else 0

    def _gc(self, aliases: Callable[[Path], list[str]] | None) -> int:
        """The sweep of :meth:`gc` (caller holds the lock exclusively)."""
        removed = 0
        failed: list[str] = []
        stale = [d for d, meta in self.sandboxes() if not self.owner_alive(meta.get("owner"))]
        # A dead owner's sandbox may still be tearing down (its holder only just saw EOF):
        # end those processes first, or the deletion races the unmount and leaves files.
        end_processes_using([str(d) for d in stale] + [a for d in stale for a in (aliases(d) if aliases else [])])
        for d in stale:
            removed += _drop(d, failed)
        for p in (self.root / "t").iterdir():
            if not self.owner_alive(p.name.split(".")[0]):
                removed += _drop(p, failed)
        for snap in self._records():
            if snap.owner is not None and not self.owner_alive(snap.owner):
                self.delete(snap.key)
                removed += 1
        removed += self._remove_unreferenced(failed)
        for p in (self.root / "k").glob("*.said.*"):  # a run's "said once" markers, a day on
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > 86400:
                    p.unlink()
        for p in (self.root / "o").glob("*.lock"):
            if not self.owner_alive(p.stem):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        if failed:  # said, not raised: the rest was collected, and the caller's own clean-up runs
            warnings.warn(
                f"pytest-sandbox: gc could not remove {len(failed)} entries of the cache, kept for the next gc: "
                f"{'; '.join(failed[:3])}. If that fails again, delete them by hand (rm -rf).",
                RuntimeWarning,
                stacklevel=3,
            )
        return removed

    def _remove_unreferenced(self, failed: list[str] | None = None) -> int:
        """Delete layers that no record and no live sandbox uses (caller holds :meth:`exclusive`)."""
        used: set[str] = set()
        keys: set[str] = set()
        for snap in self._records():
            used.update(snap.layers)
            keys.add(snap.key)
            if snap.process is not None:
                keys.add(str(snap.process.get("images", "")))
        for _, meta in self.sandboxes():
            used.update(meta.get("layers", ()))
        removed = 0
        for p in (self.root / "l").iterdir():
            if p.name not in used:
                if failed is None:
                    rmtree(p)
                    removed += 1
                else:
                    removed += _drop(p, failed)
        for p in (self.root / "i").glob("*.json"):  # records of layers gone, just now or before
            if not self.layer_path(p.stem).exists():
                p.unlink()
        for p in (self.root / "oci" / "exported").glob("*.json"):  # which blob a gone layer was pushed as
            if not self.layer_path(p.stem).exists():
                p.unlink(missing_ok=True)
        for p in (self.root / "p").iterdir():  # process images of live snapshots gone
            if p.name not in keys:
                removed += _drop(p, failed if failed is not None else [])
        return removed

    def remove(self, keys: list[str]) -> int:
        """Delete these snapshot records and every layer left unreferenced."""
        with self.exclusive():
            for key in keys:
                self.delete(key)
            return self._remove_unreferenced()

    def prune(self, older_than: float = 0.0) -> list[str]:
        """Delete snapshots not used for ``older_than`` seconds (all of them with 0), except those
        a live sandbox runs from. Returns the keys removed."""
        now = time.time()
        busy = {m.get("snapshot") for _, m in self.sandboxes() if self.owner_alive(m.get("owner"))}
        doomed = [s.key for s in self.all() if s.key not in busy and now - self.last_used(s) >= older_than]
        self.remove(doomed)
        return doomed

    def touch(self, snap: Snapshot) -> None:
        """Record that ``snap`` was used now (what prune's age counts from)."""
        with contextlib.suppress(OSError):
            os.utime(self._record(snap.key))

    def last_used(self, snap: Snapshot) -> float:
        try:
            return self._record(snap.key).stat().st_mtime
        except OSError:
            return snap.created
