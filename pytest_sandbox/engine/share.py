"""Snapshots as OCI images, to share them between machines: push to a registry and pull back, or
export to an OCI image layout archive and import it, always under the same setup key.

An image holds one layer per snapshot layer. Overlay whiteouts (0/0 character devices) become OCI
whiteouts (``.wh.NAME``) and opaque directories get a ``.wh..wh..opq`` marker; owners are written
as the sandbox saw them (the id range is shifted back); ``user.*`` xattrs go in PAX headers. The
tar stream is deterministic (sorted, fixed header fields, gzip without a timestamp), so a layer
gives the same digest whenever it is written with the same zlib.

Which blob each local layer was pushed as is remembered (``oci/exported/<layer>.json``): a push
sends only the blobs the registry lacks, and a pull downloads only the layers no local layer has
(layers pulled or imported are named after their digest, as registry bases are).

Pulling by key trusts the registry as a build cache does; nothing in a pulled image can write
outside its layer (``unpack.py``), and its record is checked field by field (a pulled snapshot
is always a plain root filesystem: never a host base).
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import struct
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._hostfs import TreeWalk
from ..errors import ConfigError, RegistryError
from ..image import Service, env_items
from ..oci import Reference, RegistryClient, host_platform
from ..store import Store, rmtree, valid_key, write_atomic
from ..types import DOCKER_REPOSITORY, LABEL, LogCallback, Snapshot
from .fetch import DIGEST, Fetch, fetch_layer
from .host import DEFAULT_ENV
from .ids import IdMap
from .layers import OPAQUE
from .unpack import OPAQUE_MARKER, WHITEOUT, LayerError, bounded_tar, layer_id, members

__all__ = [
    "ANNOTATION_KEY",
    "ANNOTATION_PARENT",
    "ANNOTATION_STEP",
    "LAYER_MEDIA",
    "MANIFEST_MEDIA",
    "Shares",
]

MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_KEY = "org.pytest-sandbox.key"
ANNOTATION_PARENT = "org.pytest-sandbox.parent"
ANNOTATION_STEP = "org.pytest-sandbox.step"
ANNOTATION_RECORD = "org.pytest-sandbox.snapshot"
REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
_GZIP_LEVEL = 1  # fast: on a LAN or loopback the compressor, not the network, sets the pace


@dataclass(frozen=True)
class LayerBlob:
    """One layer as an OCI blob: the gzip's digest and size, and the tar's digest (diff id)."""

    digest: str
    size: int
    diff_id: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": LAYER_MEDIA, "digest": self.digest, "size": self.size}


# -- writing layers ----------------------------------------------------------------------------
class _GzipSink:
    """Takes the tar stream: hashes it (the diff id), gzips it, hashes and writes the gzip.

    The gzip is one member made the way pigz makes it: the stream is cut into 1 MiB pieces,
    each deflated on a worker thread (zlib lets go of the GIL) primed with the 32 KiB before it,
    and ended with a sync flush. Compression sets the pace of a push, and one core does ~100
    MB/s at level 1; the output depends only on the input, never on the number of threads.
    """

    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip, deflate, no name, mtime 0

    def __init__(self, out: IO[bytes], pool: ThreadPoolExecutor) -> None:
        self.out = out
        self.pool = pool
        self.tar_hash = hashlib.sha256()
        self.gz_hash = hashlib.sha256()
        self.size = 0
        self._buf = bytearray()
        self._tail = b""
        self._crc = 0
        self._length = 0
        self._inflight: collections.deque[Future[bytes]] = collections.deque()
        self._emit(self._HEADER)

    @staticmethod
    def _deflate(data: bytes, primer: bytes) -> bytes:
        z = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -15, zdict=primer) if primer else None
        z = z or zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -15)
        return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)

    def write(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= _CHUNK:
            self._piece(bytes(self._buf[:_CHUNK]))
            del self._buf[:_CHUNK]

    def _piece(self, data: bytes) -> None:
        self.tar_hash.update(data)
        self._crc = zlib.crc32(data, self._crc)
        self._length += len(data)
        self._inflight.append(self.pool.submit(self._deflate, data, self._tail))
        self._tail = data[-32768:]
        while len(self._inflight) > 4:  # bounded memory: a few pieces in flight
            self._emit(self._inflight.popleft().result())

    def _emit(self, data: bytes) -> None:
        if data:
            self.gz_hash.update(data)
            self.out.write(data)
            self.size += len(data)

    def close(self) -> LayerBlob:
        if self._buf:
            self._piece(bytes(self._buf))
            self._buf.clear()
        while self._inflight:
            self._emit(self._inflight.popleft().result())
        # The last, empty block, then the CRC and length of what went in.
        self._emit(zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))
        self._emit(struct.pack("<II", self._crc & 0xFFFFFFFF, self._length & 0xFFFFFFFF))
        return LayerBlob("sha256:" + self.gz_hash.hexdigest(), self.size, "sha256:" + self.tar_hash.hexdigest())


def _xattrs(fd: int) -> dict[str, str]:
    """The ``user.*`` xattrs worth carrying (overlayfs' own are the engine's business)."""
    out = {}
    with contextlib.suppress(OSError):
        for name in sorted(os.listxattr(fd)):
            if name.startswith("user.") and not name.startswith("user.overlay."):
                out["SCHILY.xattr." + name] = os.getxattr(fd, name).decode("utf-8", "surrogateescape")
    return out


class _LayerWriter:
    """Writes one layer tree (overlay format) as an OCI layer tar into a :class:`_GzipSink`."""

    def __init__(self, root: Path, ids: IdMap | None, sink: _GzipSink) -> None:
        self.root = root
        self.ids = ids
        self.sink = sink
        self.links: dict[tuple[int, int], str] = {}

    def _owner(self, st: os.stat_result) -> tuple[int, int]:
        if self.ids is None:  # rootless: everything is the caller's, root inside
            return 0, 0
        return self.ids.inside_uid(st.st_uid), self.ids.inside_gid(st.st_gid)

    def _header(self, name: str, st: os.stat_result | None, kind: bytes, **kw: Any) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        if st is not None:
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = self._owner(st)
            info.mtime = int(st.st_mtime)
        else:
            info.mode, info.mtime = 0o600, 0
        info.uname = info.gname = ""
        for k, v in kw.items():
            setattr(info, k, v)
        return info

    def _put(self, info: tarfile.TarInfo) -> None:
        self.sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def write(self) -> LayerBlob:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            walk = TreeWalk(fd)  # any depth: a sandbox can make trees deeper than Python recurses
            try:
                for name, st in walk:
                    if st is not None:
                        self._entry(walk, name, st)
            finally:
                walk.close()
        finally:
            os.close(fd)
        self.sink.write(b"\0" * 1024)
        return self.sink.close()

    def _entry(self, walk: TreeWalk, name: str, st: os.stat_result) -> None:
        dfd, rel = walk.fd, walk.rel
        path = rel + name
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            walk.enter(name)
            info = self._header(path + "/", st, tarfile.DIRTYPE)
            info.pax_headers = _xattrs(walk.fd)
            self._put(info)
            with contextlib.suppress(OSError):
                if os.getxattr(walk.fd, OPAQUE) == b"y":
                    self._put(self._header(f"{path}/{OPAQUE_MARKER}", None, tarfile.REGTYPE))
        elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in self.links and not stat.S_ISCHR(mode):
            self._put(self._header(path, st, tarfile.LNKTYPE, linkname=self.links[(st.st_dev, st.st_ino)]))
        elif stat.S_ISREG(mode):
            ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                info = self._header(path, st, tarfile.REGTYPE, size=st.st_size)
                info.pax_headers = _xattrs(ffd)
                self._put(info)
                left = st.st_size
                while left > 0:  # exactly the size in the header, even if the file changed
                    chunk = os.read(ffd, min(_CHUNK, left)) or b"\0" * min(_CHUNK, left)
                    self.sink.write(chunk)
                    left -= len(chunk)
                if st.st_size % 512:
                    self.sink.write(b"\0" * (512 - st.st_size % 512))
            finally:
                os.close(ffd)
            if st.st_nlink > 1:
                self.links[(st.st_dev, st.st_ino)] = path
        elif stat.S_ISLNK(mode):
            self._put(self._header(path, st, tarfile.SYMTYPE, linkname=os.readlink(name, dir_fd=dfd)))
        elif stat.S_ISCHR(mode) and st.st_rdev == 0:  # an overlay whiteout
            self._put(self._header(rel + WHITEOUT + name, None, tarfile.REGTYPE))
        elif stat.S_ISFIFO(mode):
            self._put(self._header(path, st, tarfile.FIFOTYPE))
        # sockets and device nodes: not in layers (copy_tree and unpack leave them out)


# -- reading images: from a registry or an archive --------------------------------------------


def _record_of(snap: Snapshot) -> dict[str, Any]:
    return {
        "env": [list(p) for p in snap.env],
        "workdir": snap.workdir,
        "description": snap.description,
        "created": snap.created,
        "services": [s.to_json() for s in snap.services],
        "image": snap.base.get("image"),
    }


def _checked_record(data: Any, what: str) -> dict[str, Any]:
    """The snapshot record of a pulled image, every field checked (a registry is not trusted to
    send well-formed values)."""

    def bad(field: str) -> ConfigError:
        return ConfigError(f"{what}: its {field} annotation is malformed; it was not pushed by pytest-sandbox")

    if not isinstance(data, dict):
        raise bad("snapshot")
    env = data.get("env", [])
    if not isinstance(env, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and "\0" not in x for x in p) for p in env
    ):
        raise bad("env")
    try:  # names a shell can export, as every sandbox's environment
        env_items(dict(env))
    except ConfigError:
        raise bad("env") from None
    workdir = data.get("workdir", "/")
    if not isinstance(workdir, str) or not workdir.startswith("/") or "\0" in workdir:
        raise bad("workdir")
    services = data.get("services", [])
    try:
        parsed = tuple(Service.from_json(s) for s in services)
    except (TypeError, KeyError, ValueError, AttributeError):
        raise bad("services") from None
    created = data.get("created", time.time())
    return {
        "env": tuple((k, v) for k, v in env),
        "workdir": workdir,
        "description": str(data.get("description", ""))[:2000],
        "created": float(created) if isinstance(created, (int, float)) else time.time(),
        "services": parsed,
        "image": str(data["image"]) if isinstance(data.get("image"), str) else None,
    }


class Shares:
    """Pushes, pulls, exports and imports the snapshots of ``store`` (layers owned by ``ids``)."""

    def __init__(self, store: Store, ids: IdMap | None, client: Callable[[], RegistryClient], backend: str) -> None:
        self.store = store
        self.ids = ids
        self._client = client
        self.backend_name = backend

    # -- which blob is which layer ---------------------------------------------------------
    def _map_file(self, layer: str) -> Path:
        d = self.store.root / "oci" / "exported"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{layer}.json"

    def _known(self, layer: str) -> LayerBlob | None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(self._map_file(layer).read_text())
            return LayerBlob(str(data["digest"]), int(data["size"]), str(data["diff_id"]))
        return None

    def remember(self, layer: str, blob: LayerBlob) -> None:
        """Record that ``layer`` is ``blob`` (written after a push or pull, read by the next)."""
        write_atomic(self._map_file(layer), json.dumps(blob.__dict__))

    def _local_layer(self, digest: str) -> str | None:
        """A local layer that is blob ``digest``, intact, if there is one."""
        lid = layer_id(digest)
        if self.store.layer_ok(lid):
            return lid
        for p in (self.store.root / "oci" / "exported").glob("*.json"):
            known = self._known(p.stem)
            if known is not None and known.digest == digest and self.store.layer_ok(p.stem):
                return p.stem
        return None

    def write_layer(self, layer: str, out: IO[bytes]) -> LayerBlob:
        """Write ``layer`` as a gzip OCI layer into ``out``; remembers its digests."""
        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="gzip") as pool:
                blob = _LayerWriter(self.store.layer_path(layer), self.ids, _GzipSink(out, pool)).write()
        except PermissionError as exc:
            raise ConfigError(
                f"cannot read {exc.filename} in layer {layer} to export it: rootless, a file the sandbox made "
                "unreadable (mode 000) cannot be read from outside. Make it readable in the recipe, or push as root."
            ) from exc
        self.remember(layer, blob)
        return blob

    # -- the image of a snapshot -------------------------------------------------------------
    def _check_shareable(self, snap: Snapshot) -> None:
        if snap.base.get("kind") == "host":
            raise ConfigError(
                f"snapshot {snap.short} starts from Image.host(), which shares this machine's /usr and /etc: it "
                "cannot run anywhere else. Start the recipe from Image.debian(...) or Image.from_registry(...) "
                "to push or export it."
            )

    def _config_and_manifest(self, snap: Snapshot, blobs: list[LayerBlob]) -> tuple[bytes, bytes]:
        env = dict(snap.env)
        env.setdefault("PATH", DEFAULT_ENV["PATH"])
        os_, arch, variant = host_platform()
        labels = {  # what the docker backend reads (and lists images by)
            LABEL: "1",
            f"{LABEL}.parent": snap.parent or "",
            f"{LABEL}.description": snap.description,
            f"{LABEL}.created": repr(snap.created),
        }
        config: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.created)),
            "architecture": arch,
            "os": os_,
            "config": {
                "Env": [f"{k}={v}" for k, v in env.items()],
                "WorkingDir": snap.workdir,
                "Cmd": ["/bin/sh"],
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
        }
        if variant:
            config["variant"] = variant
        raw_config = json.dumps(config, sort_keys=True).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA,
            "config": {
                "mediaType": CONFIG_MEDIA,
                "digest": "sha256:" + hashlib.sha256(raw_config).hexdigest(),
                "size": len(raw_config),
            },
            "layers": [b.descriptor() for b in blobs],
            "annotations": {
                ANNOTATION_KEY: snap.key,
                ANNOTATION_PARENT: snap.parent or "",
                ANNOTATION_STEP: snap.description,
                ANNOTATION_RECORD: json.dumps(_record_of(snap), sort_keys=True),
                "org.opencontainers.image.created": config["created"],
            },
        }
        return raw_config, json.dumps(manifest, sort_keys=True).encode()

    # -- push --------------------------------------------------------------------------------
    def push(self, snap: Snapshot, repository: str, log: LogCallback) -> list[str]:
        """Push ``snap`` and its ancestors to ``repository``, each tagged with its key; returns
        the references pushed (``snap``'s last). Blobs the registry has are not sent again."""
        self._check_shareable(snap)
        repo = _repository(repository)
        client = self._client()
        chain = snap.lineage(self.store.get)
        _files_only(chain, log)
        layers = list(dict.fromkeys(x for s in chain for x in s.layers))
        tmp = self.store.tmp_dir()
        sent = [0, 0]

        def one(layer: str) -> LayerBlob:
            known = self._known(layer)
            if known is not None and client.has_blob(repo, known.digest):
                return known
            path = tmp / layer
            with path.open("wb") as out:
                blob = self.write_layer(layer, out)
            if not client.has_blob(repo, blob.digest):
                client.upload(repo, blob.digest, blob.size, lambda: _chunks(path))
                sent[0] += 1
                sent[1] += blob.size
            path.unlink()
            return blob

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(layers)))) as pool:
                blobs = dict(zip(layers, pool.map(one, layers), strict=True))
            pushed = []
            for s in chain:
                raw_config, raw_manifest = self._config_and_manifest(s, [blobs[x] for x in s.layers])
                digest = "sha256:" + hashlib.sha256(raw_config).hexdigest()
                if not client.has_blob(repo, digest):
                    client.upload(repo, digest, len(raw_config), lambda raw=raw_config: [raw])  # type: ignore[misc]
                manifest_digest = client.put_manifest(repo, s.key, raw_manifest, MANIFEST_MEDIA)
                pushed.append(f"{repo.registry}/{repo.repository}:{s.key}")
            skipped = len(layers) - sent[0]
            log(
                f"pushed {snap.short} to {repo.registry}/{repo.repository} ({len(chain)} tags): {sent[0]} layers sent "
                f"({sent[1] / 1e6:.1f} MB), {skipped} already there; pin it as "
                f"{repo.registry}/{repo.repository}@{manifest_digest}"
            )
            return pushed
        finally:
            rmtree(tmp)

    # -- pull and import ---------------------------------------------------------------------
    def _materialise(
        self,
        manifest: dict[str, Any],
        config: dict[str, Any],
        fetch: Fetch,
        what: str,
        want_key: str | None,
        log: LogCallback,
    ) -> tuple[Snapshot, bool]:
        """A snapshot record and its layers from an image, under the key the image carries; and
        whether this call brought it (False: another process had, while we waited)."""
        annotations = manifest.get("annotations") or {}
        key = annotations.get(ANNOTATION_KEY)
        if not isinstance(key, str) or not key:
            raise RegistryError(
                f"{what} is not a pytest-sandbox snapshot (no {ANNOTATION_KEY} annotation). To start a recipe "
                "from a plain image, use Image.from_registry(...)."
            )
        parent = annotations.get(ANNOTATION_PARENT) or None
        # Both become file names in the store (its lock, its record): checked before any use.
        for name, value in ((ANNOTATION_KEY, key), (ANNOTATION_PARENT, parent)):
            if value is not None and not valid_key(value):
                raise RegistryError(
                    f"{what}: its {name} annotation {str(value)[:100]!r} is not a snapshot key; it was not pushed by "
                    "pytest-sandbox, or was altered. Refusing the image; push the snapshot again."
                )
        if parent is not None and self._descends_from(parent, key):
            raise RegistryError(
                f"{what}: snapshot {key[:12]} names itself as its own ancestor (its parent chain loops); it was "
                "altered or forged. Refusing the image; push the snapshot again."
            )
        if want_key is not None and key != want_key:
            raise RegistryError(
                f"{what} says it is snapshot {key[:12]}, not {want_key[:12]} as its tag says: the registry's tag "
                "was moved or copied by hand. Push the snapshot again, or pull it by its own key."
            )
        record = _checked_record(_json(annotations.get(ANNOTATION_RECORD, "{}"), what), what)
        descs = manifest.get("layers") or []
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if not descs or len(diff_ids) != len(descs):
            raise RegistryError(f"{what}: its config lists {len(diff_ids)} layers, its manifest {len(descs)}")
        with self.store.build_lock(key):  # racing pulls (and builds) of a key: one does the work
            have = self.store.get(key)
            if have is not None:
                return have, False
            tmp = self.store.tmp_dir()
            try:
                layers = []
                # Held from the first publish to the record: gc never sees these layers unreferenced.
                with self.store.shared():
                    for desc, diff_id in zip(descs, diff_ids, strict=True):
                        layers.append(self._layer(desc, str(diff_id), fetch, tmp, what, log))
                    snap = Snapshot(
                        key=key,
                        backend=self.backend_name,
                        layers=tuple(layers),
                        base={"kind": "rootfs", **({"image": record["image"]} if record["image"] else {})},
                        env=record["env"],
                        workdir=record["workdir"],
                        parent=parent,
                        created=record["created"],
                        description=record["description"],
                        services=record["services"],
                    )
                    self.store.put(snap)
                return snap, True
            finally:
                rmtree(tmp)

    def _descends_from(self, parent: str, key: str) -> bool:
        """True when the chain of stored parents from ``parent`` reaches ``key`` (or loops)."""
        seen: set[str] = set()
        current: str | None = parent
        while current is not None:
            if current == key or current in seen:
                return True
            seen.add(current)
            snap = self.store.get(current)
            current = snap.parent if snap is not None else None
        return False

    def _layer(self, desc: dict[str, Any], diff_id: str, fetch: Fetch, tmp: Path, what: str, log: LogCallback) -> str:
        digest = str(desc.get("digest", ""))
        local = self._local_layer(digest) if DIGEST.match(digest) else None
        if local is not None:
            return local
        lid = fetch_layer(self.store, self.ids, fetch, desc, diff_id, tmp, what, log)
        size = desc.get("size")
        self.remember(lid, LayerBlob(digest, size if isinstance(size, int) else 0, diff_id))
        return lid

    def has(self, repository: str, key: str) -> bool:
        """True when ``repository`` holds snapshot ``key`` (a HEAD request)."""
        return self._client().has_manifest(_repository(repository), key)

    def pull(self, reference: str, log: LogCallback) -> Snapshot:
        """Pull the snapshot at ``reference`` (``REPO:KEY``, or ``REPO@sha256:...`` to pin the
        content) into the store, under its key."""
        ref = Reference.parse(reference)
        client = self._client()
        want = None if ref.digest else ref.tag
        if want is not None:
            have = self.store.get(want)
            if have is not None:
                return have
        digest, manifest = client.resolve(ref)
        config = _json(client.blob(ref, manifest["config"]["digest"]).decode(), str(ref))

        def fetch(d: str, size: int | None, out: IO[bytes]) -> None:
            client.download(ref, d, size, out)

        snap, fresh = self._materialise(manifest, config, fetch, f"{ref.registry}/{ref.repository}@{digest}", want, log)
        if fresh:
            log(f"pulled {snap.short} from {ref.registry}/{ref.repository}")
        return snap

    # -- archives ----------------------------------------------------------------------------
    def export(self, snap: Snapshot, dest: Path, log: LogCallback) -> Path:
        """Write ``snap`` and its ancestors as an OCI image layout archive (``docker load`` and
        ``skopeo copy oci-archive:`` read it too: it carries docker's manifest.json as well)."""
        self._check_shareable(snap)
        chain = snap.lineage(self.store.get)
        _files_only(chain, log)
        layers = list(dict.fromkeys(x for s in chain for x in s.layers))
        tmp = self.store.tmp_dir()
        try:
            blobs: dict[str, LayerBlob] = {}
            part = dest.with_name(f".{dest.name}.part")
            with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tf:
                _add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
                _add(tf, "blobs")
                _add(tf, "blobs/sha256")
                for layer in layers:
                    path = tmp / layer
                    with path.open("wb") as out:
                        blobs[layer] = self.write_layer(layer, out)
                    tf.add(path, f"blobs/sha256/{blobs[layer].digest[7:]}", recursive=False, filter=_plain)
                    path.unlink()
                index, docker = [], []
                for s in chain:
                    raw_config, raw_manifest = self._config_and_manifest(s, [blobs[x] for x in s.layers])
                    cfg_digest = hashlib.sha256(raw_config).hexdigest()
                    man_digest = hashlib.sha256(raw_manifest).hexdigest()
                    _add(tf, f"blobs/sha256/{cfg_digest}", raw_config)
                    _add(tf, f"blobs/sha256/{man_digest}", raw_manifest)
                    index.append(
                        {
                            "mediaType": MANIFEST_MEDIA,
                            "digest": f"sha256:{man_digest}",
                            "size": len(raw_manifest),
                            "annotations": {
                                REF_NAME: s.key,
                                "io.containerd.image.name": f"{DOCKER_REPOSITORY}:{s.key}",
                            },
                        }
                    )
                    docker.append(
                        {
                            "Config": f"blobs/sha256/{cfg_digest}",
                            "RepoTags": [f"{DOCKER_REPOSITORY}:{s.key}"],  # as the docker backend names it
                            "Layers": [f"blobs/sha256/{blobs[x].digest[7:]}" for x in s.layers],
                        }
                    )
                _add(tf, "index.json", json.dumps({"schemaVersion": 2, "manifests": index}).encode())
                _add(tf, "manifest.json", json.dumps(docker).encode())
            os.replace(part, dest)
            log(f"exported {snap.short} ({len(chain)} snapshots, {len(layers)} layers) to {dest}")
            return dest
        finally:
            rmtree(tmp)
            with contextlib.suppress(FileNotFoundError):
                dest.with_name(f".{dest.name}.part").unlink()

    def import_archive(self, path: Path, log: LogCallback) -> list[Snapshot]:
        """Bring every snapshot of an OCI image layout archive into the store; returns them."""
        what = str(path)
        with contextlib.ExitStack() as stack:
            try:
                raw = stack.enter_context(_decompressed(stack.enter_context(path.open("rb"))))
                tf = stack.enter_context(bounded_tar(raw, what, stream=False))
                files: dict[str, tarfile.TarInfo] = {}
                for m in members(tf):
                    name = m.name.removeprefix("./")
                    if m.isreg() and (name in _LAYOUT_FILES or name.startswith("blobs/sha256/")):
                        if len(files) >= _MAX_ARCHIVE_FILES:
                            raise RegistryError(
                                f"{what} holds more than {_MAX_ARCHIVE_FILES} blobs: not an archive of ours"
                            )
                        m.pax_headers = {}  # kept for its offsets, not its headers
                        files[name] = m
            except LayerError as exc:
                raise RegistryError(str(exc)) from exc
            except (OSError, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
                raise ConfigError(f"{path} is not an image archive (a tar): {exc}") from exc
            return self._import_from(tf, files, what, path, log)

    def _import_from(
        self, tf: tarfile.TarFile, members: dict[str, tarfile.TarInfo], what: str, path: Path, log: LogCallback
    ) -> list[Snapshot]:
        """Every snapshot of the archive ``tf`` (its blobs and layout files in ``members``)."""

        def read(name: str, limit: int = 4 << 20) -> bytes:
            m = members.get(name)
            if m is None or m.size > limit:
                raise RegistryError(f"{what} has no {name} (or it is too large): not an OCI image layout archive")
            f = tf.extractfile(m)
            assert f is not None
            return f.read()

        def fetch(digest: str, size: int | None, out: IO[bytes]) -> None:
            m = members.get(f"blobs/sha256/{digest[7:]}")
            if m is None:
                raise RegistryError(f"{what} lacks blob {digest}: the archive is incomplete")
            f = tf.extractfile(m)
            assert f is not None
            h, n = hashlib.sha256(), 0
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
                n += len(chunk)
                if size is not None and n > size:
                    raise RegistryError(f"{what}: blob {digest} outgrows its descriptor: the archive is damaged")
                out.write(chunk)
            if "sha256:" + h.hexdigest() != digest or (size is not None and n != size):
                raise RegistryError(f"{what}: blob {digest} does not match its digest: the archive is damaged")

        def blob(digest: str) -> Any:
            data = read(f"blobs/sha256/{str(digest)[7:]}")
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise RegistryError(f"{what}: blob {digest} does not match its digest: the archive is damaged")
            return _json(data.decode(), what)

        index = _json(read("index.json").decode(), what)
        out = []
        for entry in index.get("manifests") or []:
            manifest = blob(entry["digest"])
            config = blob(manifest["config"]["digest"])
            out.append(self._materialise(manifest, config, fetch, what, None, log)[0])
        log(f"imported {len(out)} snapshots from {path}")
        return out


_LAYOUT_FILES = ("oci-layout", "index.json", "manifest.json")
_MAX_ARCHIVE_FILES = 1 << 16


@contextlib.contextmanager
def _decompressed(f: IO[bytes]) -> Iterator[IO[bytes]]:
    """``f`` (an archive file), decompressed when it is gzip, xz or bzip2: the tar itself, so
    that its headers are counted as they are, not as their compressed bytes."""
    magic = f.read(6)
    f.seek(0)
    kinds: dict[bytes, Callable[[IO[bytes]], Any]] = {
        b"\x1f\x8b": lambda raw: gzip.GzipFile(fileobj=raw),
        b"\xfd7zXZ\x00": lzma.LZMAFile,
        b"BZh": bz2.BZ2File,
    }
    opener = next((op for sig, op in kinds.items() if magic.startswith(sig)), None)
    if opener is None:
        yield f
        return
    with opener(f) as opened:
        yield opened


def _repository(repository: str) -> Reference:
    ref = Reference.parse(repository)
    if ref.digest or (ref.tag and ref.tag != "latest" and repository.rsplit("/", 1)[-1].count(":")):
        raise ConfigError(
            f"{repository!r} names a tag or digest; give the repository only (e.g. registry.example/team/env): "
            "snapshots are tagged with their keys"
        )
    return ref


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from iter(lambda: f.read(_CHUNK), b"")


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RegistryError(f"{what}: a manifest, config or record is not valid JSON") from exc


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The archive's own entries belong to whoever wrote it: tools that unpack it as that user
    # (skopeo's oci-archive: does, and chowns) cannot give files to root.
    info.uid, info.gid = os.geteuid(), os.getegid()
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    info.mtime = 0
    return info


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    tf.addfile(_plain(info), None if data is None else io.BytesIO(data))


def _files_only(chain: list[Snapshot], log: LogCallback) -> None:
    """Say, once, that live snapshots leave as their files: process images hold memory (secrets)
    and restoring a crafted one as root would run its code, so they never leave this machine."""
    live = [s.short for s in chain if s.live]
    if live:
        log(
            f"live snapshot {', '.join(live)} goes as its files: its processes stay on this machine "
            "(a sandbox created from the copy starts its services instead)"
        )
