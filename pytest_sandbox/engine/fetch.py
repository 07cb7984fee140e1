"""OCI layer blobs into layers of the store: downloaded (or read from an archive), verified and
unpacked at once, once per digest whoever asks. Registry bases and pulled snapshots share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import RegistryError, SandboxError
from ..store import Store, rmtree
from ..types import LogCallback
from .ids import IdMap
from .unpack import Unpacked, layer_id, unpack_layer

__all__ = ["DIGEST", "Fetch", "fetch_layer"]

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031

Fetch = Callable[[str, int | None, IO[bytes]], None]
"""Writes blob ``digest`` (of ``size`` bytes, when known) into a file, verifying it as it goes."""


def fetch_layer(
    store: Store,
    ids: IdMap | None,
    fetch: Fetch,
    desc: dict[str, Any],
    diff_id: str | None,
    tmp: Path,
    what: str,
    log: LogCallback,
) -> str:
    """The layer of blob ``desc`` (an OCI descriptor), fetched and unpacked unless the store has
    it; ``diff_id`` (the config's) is checked against the tar when given. Call with the store's
    ``shared()`` lock held, until the record that references the layer is written."""
    digest = str(desc.get("digest", ""))
    size = desc.get("size")
    if not DIGEST.match(digest):
        raise RegistryError(f"{what}: layer digest {digest!r} is not a sha256 digest")
    lid = layer_id(digest)
    with store.build_lock(lid):  # one download per layer, whoever asks
        if store.layer_ok(lid):
            return lid
        if store.layer_path(lid).exists():  # damaged or half-published: redo it
            store.forget_layer(lid)
            rmtree(store.layer_path(lid))
        mb = f"{size / 1e6:.1f} MB" if isinstance(size, int) else "size unknown"
        log(f"    layer {digest[7:19]}: {mb}")
        where = f"layer {digest} of {what}"
        unpacked = _fetch_and_unpack(fetch, desc, tmp / lid, where, ids)
        if unpacked.skipped:
            log(f"    layer {digest[7:19]}: {unpacked.skipped} device nodes skipped (a sandbox has its own /dev)")
        if diff_id is not None and unpacked.diff_id != diff_id:
            raise RegistryError(
                f"{where} unpacks to {unpacked.diff_id}, not the {diff_id} its config names; refusing it "
                "(nothing was kept)"
            )
        store.publish_layer(tmp / lid, lid)
        return lid


def _fetch_and_unpack(fetch: Fetch, desc: dict[str, Any], dest: Path, what: str, ids: IdMap | None) -> Unpacked:
    """Download and unpack at once: a thread fetches the blob (gunzipping a gzip one) into a pipe
    that the unpacker reads. The blob's digest is checked when the download ends; whatever was
    unpacked is published by the caller only after that, so a bad blob leaves nothing."""
    digest, size = str(desc["digest"]), desc.get("size")
    media = str(desc.get("mediaType", ""))
    if not media.endswith(("gzip", "tar")):
        blob = dest.with_name(dest.name + ".blob")  # zstd and the like: through a file
        try:
            with blob.open("wb") as out:
                fetch(digest, size if isinstance(size, int) else None, out)
            return unpack_layer(blob, dest, what, ids=ids)
        finally:
            blob.unlink(missing_ok=True)
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)  # fewer wake-ups between the two sides
    failed: list[BaseException] = []

    def feed() -> None:
        try:
            with os.fdopen(w, "wb") as out:
                sink: Any = _Gunzip(out) if media.endswith("gzip") else out
                fetch(digest, size if isinstance(size, int) else None, sink)
                if isinstance(sink, _Gunzip):
                    sink.close()
        except BaseException as exc:
            failed.append(exc)

    feeder = threading.Thread(target=feed, name="layer-download", daemon=True)
    feeder.start()
    try:
        with os.fdopen(r, "rb") as src:
            unpacked = unpack_layer(src, dest, what, ids=ids)
    except SandboxError as exc:
        feeder.join()
        if failed and not isinstance(failed[0], BrokenPipeError):
            raise _download_error(failed[0], what) from exc  # the download's failure broke the tar
        raise
    feeder.join()
    if failed:
        raise _download_error(failed[0], what)
    return unpacked


def _download_error(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, zlib.error):
        return RegistryError(f"{what} is not valid gzip ({exc}); nothing of it was kept")
    return exc


class _Gunzip:
    """A writable that gunzips what it is given into ``out`` (members one after another). Data
    that does not gunzip ends the output but not the download, so the blob's digest check
    still runs and names the real fault (a corrupt blob) before :meth:`close` names this one."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self._z = zlib.decompressobj(31)
        self.broken: zlib.error | None = None

    def write(self, data: bytes) -> int:
        n = len(data)
        try:
            while data and self.broken is None:
                self.out.write(self._z.decompress(data))
                data = self._z.unused_data
                if data:  # a member ended and another begins
                    self._z = zlib.decompressobj(31)
        except zlib.error as exc:
            self.broken = exc
            self.out.close()  # the unpacker sees the end of its input
        return n

    def close(self) -> None:
        if self.broken is None:
            self.out.write(self._z.flush())
            if not self._z.eof:
                self.broken = zlib.error("the gzip stream ends early")
        if self.broken is not None:
            raise self.broken
