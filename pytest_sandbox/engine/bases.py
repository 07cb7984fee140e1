"""Getting the base layer of a recipe onto the local engine: a registry image (pulled once per
layer digest), a Debian rootfs made with mmdebstrap, a rootfs directory or tarball, or the host's
system directories. Each becomes the first snapshot of the recipe's chain.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .._build import host_ca_bundle, mmdebstrap_tar
from ..errors import ConfigError, RegistryError, SnapshotBuildError
from ..image import DebianBase, HostBase, Image, RegistryBase, env_items
from ..oci import Reference, RegistryClient
from ..store import Store, rmtree, write_atomic
from ..types import LogCallback, Snapshot
from .fetch import fetch_layer
from .ids import IdMap

__all__ = ["HOST_SYSTEM_DIRS", "Bases"]

# Directories a host base shares from the host, each as its own overlay. Home directories and
# /var (submounts, per-host state) are deliberately not among them.
HOST_SYSTEM_DIRS = ("usr", "etc", "opt", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


class Bases:
    """Makes base snapshots in ``store`` for the backend named ``backend_name``; layers are owned
    by ``ids`` (None: rootless, owned by the caller)."""

    def __init__(self, store: Store, ids: IdMap | None, backend_name: str = "local") -> None:
        self.store = store
        self.ids = ids
        self.rootless = ids is None
        self.backend_name = backend_name
        self._registry_client: RegistryClient | None = None

    def build(self, image: Image, key: str, log: LogCallback) -> Snapshot:
        b = image.base
        if isinstance(b, RegistryBase):
            return self._pull(image, b, key, log)
        log(f"[0/{len(image.steps)}] {image.describe().splitlines()[0]}")
        tmp = self.store.tmp_dir()
        try:
            if isinstance(b, HostBase):
                dirs = self._host_skeleton(tmp / "root")
                if self.ids is not None:
                    self.ids.shift_tree(tmp / "root")
                base: dict[str, Any] = {"kind": "host", "dirs": dirs}
            elif isinstance(b, DebianBase):
                self._mmdebstrap(b, key, tmp, len(image.steps), log)
                base = {"kind": "rootfs"}
            else:
                self._extract_rootfs(b.path, tmp / "root")
                base = {"kind": "rootfs"}
            with self.store.shared():
                layer = self.store.publish_layer(tmp / "root")
                snap = Snapshot(
                    key=key,
                    backend=self.backend_name,
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
    def registry(self) -> RegistryClient:
        """The registry client (made on first use)."""
        if self._registry_client is None:
            self._registry_client = RegistryClient(ca_file=host_ca_bundle())
        return self._registry_client

    def _oci_file(self, kind: str, digest: str) -> Path:
        d = self.store.root / "oci" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d / digest.replace(":", "-")

    def pin(self, image: Image, log: LogCallback) -> Image:
        """A registry base resolved to the digest of this platform's manifest (pinned references
        need no network). When the registry cannot be reached, the last resolution of the tag is
        used and the log says so."""
        b = image.base
        if not isinstance(b, RegistryBase) or b.digest is not None:
            return image
        try:
            ref = Reference.parse(b.ref)
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
            digest, manifest = self.registry().resolve(ref)
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

    def _pull(self, image: Image, b: RegistryBase, key: str, log: LogCallback) -> Snapshot:
        """The base snapshot of a registry image: its layers, each unpacked once per digest."""
        assert b.digest is not None  # pin() ran first
        desc = image.describe().splitlines()[0]
        log(f"[0/{len(image.steps)}] {desc}")
        ref = Reference.parse(b.ref)
        client = self.registry()
        tmp = self.store.tmp_dir()
        try:
            cached = self._oci_file("manifests", b.digest)
            if cached.is_file():
                manifest = json.loads(cached.read_text())
            else:
                digest, manifest = client.resolve(ref.pinned(b.digest))
                write_atomic(self._oci_file("manifests", digest), json.dumps(manifest))
            config_digest = manifest["config"]["digest"]
            config_file = self._oci_file("configs", config_digest)
            if not config_file.is_file():
                config_file.write_bytes(client.blob(ref, config_digest))
            image_config = json.loads(config_file.read_bytes())
            config = image_config.get("config") or {}
            # Held from the first publish to the record: gc never sees these layers unreferenced.
            with self.store.shared():
                layers = []
                diff_ids = (image_config.get("rootfs") or {}).get("diff_ids") or []
                fetch = functools.partial(client.download, ref)
                for i, layer in enumerate(manifest.get("layers") or []):
                    diff_id = str(diff_ids[i]) if len(diff_ids) == len(manifest["layers"]) else None
                    layers.append(fetch_layer(self.store, self.ids, fetch, layer, diff_id, tmp, str(ref), log))
                try:
                    env = env_items(dict(e.split("=", 1) for e in config.get("Env") or () if "=" in e))
                except ConfigError as exc:
                    raise ConfigError(f"{ref}: {exc}; the image's config sets it") from None
                snap = Snapshot(
                    key=key,
                    backend=self.backend_name,
                    layers=tuple(layers),
                    base={"kind": "rootfs", "image": str(ref.pinned(b.digest))},
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

    def _mmdebstrap(self, b: DebianBase, key: str, tmp: Path, nsteps: int, log: LogCallback) -> None:
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
