"""Test images for the registry tests: OCI image layouts written here, pushed to a real registry
(Debian's docker-registry on 127.0.0.1) with skopeo.

Layers are real gzip tarballs; a layout may hold one image or a multi-platform index.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Entry:
    """One tar member: kind is file, dir, symlink, hardlink, or raw (a TarInfo name taken as is)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0


def layer(*entries: Entry) -> bytes:
    """A gzip-compressed layer tarball with these members, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.uid, 1_700_000_000
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.link
            elif e.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, e.link
            else:
                info.size = len(e.data)
            tf.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)


@dataclass
class Layout:
    """An OCI image layout directory being written."""

    root: Path
    index: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def diff_id(self, desc: dict[str, Any]) -> str:
        """The digest of a layer's uncompressed tar, as an image config lists it."""
        h = hashlib.sha256()
        with gzip.open(self.root / "blobs" / "sha256" / str(desc["digest"])[7:]) as f:
            try:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            except (OSError, EOFError):  # a deliberately broken layer: any id will do
                return str(desc["digest"])
        return "sha256:" + h.hexdigest()

    def blob(self, data: bytes, media: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    def blob_file(self, path: Path, media: str) -> dict[str, Any]:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        dest = self.root / "blobs" / "sha256" / h.hexdigest()
        if not dest.exists():
            path.rename(dest)
        return {"mediaType": media, "digest": f"sha256:{h.hexdigest()}", "size": dest.stat().st_size}

    def image(
        self,
        layers: list[dict[str, Any]],
        *,
        env: list[str] | None = None,
        workdir: str = "",
        arch: str = "amd64",
    ) -> dict[str, Any]:
        """A manifest over these layer descriptors; returns its descriptor."""
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [self.diff_id(d) for d in layers]},
        }
        if workdir:
            config["config"]["WorkingDir"] = workdir  # type: ignore[index]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(json.dumps(config).encode(), OCI_CONFIG),
            "layers": layers,
        }
        desc = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        return {**desc, "platform": {"os": "linux", "architecture": arch}}

    def tag(self, tag: str, *descs: dict[str, Any]) -> None:
        """Name one manifest, or an index over several, ``tag`` in the layout."""
        if len(descs) == 1:
            desc = {k: v for k, v in descs[0].items() if k != "platform"}
        else:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descs)}
            desc = self.blob(json.dumps(index).encode(), OCI_INDEX)
        self.index.append({**desc, "annotations": {"org.opencontainers.image.ref.name": tag}})
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.index}))


def push(layout: Layout, tag: str, dest: str) -> None:
    """skopeo copy of ``tag`` (all platforms of an index) to ``docker://dest``, over plain HTTP."""
    subprocess.run(
        ["skopeo", "copy", "--all", "--dest-tls-verify=false", f"oci:{layout.root}:{tag}", f"docker://{dest}"],
        check=True,
        capture_output=True,
    )
