"""OCI image layers as engine layers.

Each layer tar becomes a directory in the layer store, named after its digest and shared by every
image that has it. OCI whiteouts (``.wh.NAME``) become overlayfs whiteouts (0/0 character devices,
which unprivileged users may create), opaque markers (``.wh..wh..opq``) become the
``user.overlay.opaque`` xattr the engine's overlays read. Nothing in a layer may land outside its
directory: absolute or ``..`` paths, writes through a symlink and hard links that point out are
refused, and every path is walked without following symlinks. Ownership is kept when running as
root; rootless, everything belongs to the caller (root inside the sandbox).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._hostfs import ENTRY_COST, rmtree_at
from ..errors import RegistryError, SandboxError
from ..types import format_bytes
from .ids import IdMap
from .layers import OPAQUE

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_UNPACKED",
    "OPAQUE_MARKER",
    "WHITEOUT",
    "LayerError",
    "Unpacked",
    "bounded_tar",
    "layer_id",
    "unpack_layer",
]

WHITEOUT = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_UNPACKED = 64 << 30
"""The most one layer may write: file data actually written, plus 4 KiB per entry. Real layers
stay far below it; a small archive that expands past it (holes, a million empty files) is built
to fill the disk."""


MAX_HEADER_BYTES = 1 << 20
"""What the headers of one archive member may take, read into memory: its PAX records, GNU long
name and link, sparse map. Real ones take a few KiB; tarfile would hold any size whole (a 270 KiB
gzip layer with one huge PAX header cost the runner 781 MiB)."""
MAX_HEADER_CHAIN = 16
"""Extended headers in a row before one member (tarfile reads each by recursion)."""
MAX_GLOBAL_HEADERS = 64 << 10
"""The PAX global headers of a whole archive, together: they apply to every later member."""


class LayerError(RegistryError):
    """A layer that cannot be unpacked safely (it tries to write outside its root, or is not a tar)."""


class _HeaderGuard:
    """Counts what tarfile reads while it reads a member's headers, and stops it past the bounds."""

    def __init__(self, what: str, spend: Callable[[int], None]) -> None:
        self.what = what
        self.spend = spend
        self.depth = 0
        self.read = 0  # bytes read for the headers of the member being read

    def take(self, n: int) -> None:
        if self.depth:
            self.read += n
            if self.read > MAX_HEADER_BYTES:
                raise LayerError(
                    f"{self.what}: a member's headers (PAX records, long names, sparse map) take more than "
                    f"{format_bytes(MAX_HEADER_BYTES)}; refusing the archive"
                )


class _Guarded:
    """A file object for tarfile whose reads are counted by a :class:`_HeaderGuard`."""

    def __init__(self, raw: Any, guard: _HeaderGuard) -> None:
        self.raw = raw
        self.guard = guard

    def read(self, n: int = -1) -> bytes:
        if self.guard.depth and (n < 0 or n > MAX_HEADER_BYTES):
            n = MAX_HEADER_BYTES + 1  # enough to cross the bound, never a whole file
        data: bytes = self.raw.read(n)
        self.guard.take(len(data))
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return int(self.raw.seek(pos, whence))

    def tell(self) -> int:
        return int(self.raw.tell())


def bounded_tar(raw: Any, what: str, *, stream: bool, spend: Callable[[int], None] = lambda _n: None) -> Any:
    """A ``tarfile.TarFile`` reading the plain tar ``raw`` (a stream when ``stream``, else a
    seekable file) whose headers are bounded: each member's at most :data:`MAX_HEADER_BYTES`
    (charged to ``spend``), at most :data:`MAX_HEADER_CHAIN` of them in a row, the global ones
    :data:`MAX_GLOBAL_HEADERS` together. Read it with :func:`members`, which keeps no list."""
    guard = _HeaderGuard(what, spend)

    class BoundedInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> BoundedInfo:
            if guard.depth >= MAX_HEADER_CHAIN:
                raise LayerError(
                    f"{what}: more than {MAX_HEADER_CHAIN} extended headers in a row; refusing the archive"
                )
            outer = guard.depth == 0
            if outer:
                guard.read = 0
            guard.depth += 1
            try:
                info = super().fromtarfile(tf)
            finally:
                guard.depth -= 1
            if outer:
                spend(guard.read)
                if sum(len(k) + len(v) for k, v in tf.pax_headers.items()) > MAX_GLOBAL_HEADERS:
                    raise LayerError(
                        f"{what}: its PAX global headers take more than {format_bytes(MAX_GLOBAL_HEADERS)}; "
                        "refusing the archive"
                    )
            return info

    return tarfile.open(fileobj=_Guarded(raw, guard), mode="r|" if stream else "r:", tarinfo=BoundedInfo)  # type: ignore[call-overload]


def members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Every member of ``tf``, in order, without tarfile's list of them all (a million entries
    would be held to the end)."""
    held: list[tarfile.TarInfo] = tf.members  # type: ignore[attr-defined]  # tarfile's own list
    while (m := tf.next()) is not None:
        held.clear()
        yield m


def layer_id(digest: str) -> str:
    """The layer store's name for an OCI layer (digests are unique; 128 bits of it are plenty)."""
    return "oci-" + digest.split(":", 1)[1][:32]


@dataclass(frozen=True)
class Unpacked:
    """What unpacking a layer found: device nodes left out, and the tar's digest (its diff id)."""

    skipped: int
    diff_id: str


class _Hashing:
    """A read-only stream that hashes what passes through (the uncompressed tar: the diff id)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.hash.hexdigest()


def _xattrs(m: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    """``user.*`` xattrs from PAX headers. overlayfs' own (``user.overlay.*``) are never taken
    from a layer: they steer the overlay (opaque, redirects) and only the engine sets them."""
    out = []
    for key, value in m.pax_headers.items():
        name = key.removeprefix("SCHILY.xattr.")
        if name != key and name.startswith("user.") and not name.startswith("user.overlay."):
            out.append((name, value.encode("utf-8", "surrogateescape")))
    return tuple(out)


def _set_xattrs(fd: int, xattrs: tuple[tuple[str, bytes], ...]) -> None:
    for name, value in xattrs:
        with contextlib.suppress(OSError):
            os.setxattr(fd, name, value)


@dataclass(frozen=True)
class _DirMeta:
    """What a directory entry sets once the layer is filled (a TarInfo would hold its headers)."""

    uid: int
    gid: int
    mode: int
    mtime: float
    xattrs: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, m: tarfile.TarInfo) -> _DirMeta:
        return cls(m.uid, m.gid, m.mode, m.mtime, _xattrs(m))


MAX_DIRECTORIES = 1 << 20
"""Directory entries one layer may have (each is held until the layer is filled)."""


def _open_stream(blob: IO[bytes], what: str) -> IO[bytes]:
    magic = blob.read(4)
    blob.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=blob)  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
        except ImportError:
            raise LayerError(f"{what} is zstd-compressed, which needs Python 3.14 or newer here") from None
        return zstd.ZstdFile(blob)  # type: ignore[no-any-return]
    return blob


class _Unpacker:
    def __init__(self, dest: Path, what: str, ids: IdMap | None, max_size: int) -> None:
        self._left = self._max = max_size
        dest.mkdir()
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.what = what
        self.ids = ids
        self.dirs: dict[tuple[str, ...], _DirMeta] = {}
        self.skipped = 0
        # Directory fds by path, so an entry does not walk from the root again: a tar lists a
        # directory's entries together. Dropped whenever anything is removed (a directory may be
        # what went); a cached fd is a directory this walk opened, never a symlink.
        self._fds: dict[tuple[str, ...], int] = {}

    def _forget_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        self._forget_fds()
        os.close(self.root)

    def _parts(self, name: str, member: str) -> tuple[str, ...]:
        if name.startswith("/"):
            raise LayerError(f"{self.what}: {member!r} has an absolute path; refusing the layer")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise LayerError(f"{self.what}: {member!r} climbs out of the image root with '..'; refusing the layer")
        return parts

    def _dir(self, parts: tuple[str, ...], create: bool = True) -> int:
        """An fd of the directory ``parts`` below the root, walked without following symlinks
        (the caller closes it)."""
        cached = self._fds.get(parts)
        if cached is not None:
            return os.dup(cached)
        start = len(parts)
        while start > 0 and parts[:start] not in self._fds:
            start -= 1
        fd = os.dup(self._fds[parts[:start]] if start else self.root)
        try:
            for i, part in enumerate(parts[start:], start=start):
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        raise LayerError(
                            f"{self.what}: writing below {where!r}, which is a symlink or a file in this layer; "
                            "refusing the layer"
                        ) from exc
                    raise
                os.close(fd)
                fd = nfd
            if len(self._fds) >= 256:
                self._forget_fds()
            self._fds[parts] = os.dup(fd)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def spend(self, n: int) -> None:
        self._left -= n
        if self._left < 0:
            raise LayerError(
                f"{self.what} unpacks to more than {format_bytes(self._max)} (4 KiB counted per entry); the image is "
                "too large to use here (or built to fill the disk). Use a smaller image."
            )

    def _write(self, fd: int, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """The member's data into ``fd``, charged to the budget as it is written."""
        sparse: Any = m.sparse  # typeshed calls it bytes: it is the [(offset, size), ...] map
        if sparse is not None:
            self._write_sparse(fd, tf, m, sparse)
            return
        data = tf.extractfile(m)
        while data is not None and (chunk := data.read(1 << 20)):
            self.spend(len(chunk))
            os.write(fd, chunk)

    def _write_sparse(self, fd: int, tf: tarfile.TarFile, m: tarfile.TarInfo, regions: list[tuple[int, int]]) -> None:
        """A sparse member's data regions, each where it belongs; its holes stay holes (a 1 TiB
        file of one block in a 10 KB archive costs one block). The regions are read straight from
        the stream, in the order they are stored: tarfile's reader would make every hole of zeros."""
        raw = tf.fileobj
        stored = tf.offset - m.offset_data  # the stream mode's next header: the data ends before it
        if raw is None or raw.tell() != m.offset_data or sum(size for _, size in regions) > stored:
            raise LayerError(f"{self.what}: {m.name!r} is a sparse file whose map does not fit; refusing the layer")
        os.ftruncate(fd, m.size)
        end = 0
        for offset, size in regions:
            if size == 0:  # GNU tar pads its map with empty regions
                continue
            if offset < end or size < 0 or offset + size > m.size:
                raise LayerError(f"{self.what}: {m.name!r} has a sparse map out of order or size; refusing the layer")
            end = offset + size
            while size > 0:
                chunk = raw.read(min(1 << 20, size))
                if not chunk:
                    raise LayerError(f"{self.what}: {m.name!r} ends before its data does; refusing the layer")
                self.spend(len(chunk))
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
                size -= len(chunk)

    def _clear(self, pfd: int, name: str, keep_dir: bool) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            self._forget_fds()
            rmtree_at(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)

    def _owner(self, tar_uid: int, tar_gid: int, name: str | int, pfd: int | None) -> None:
        if self.ids is not None:
            uid, gid = self.ids.uid(tar_uid), self.ids.gid(tar_gid)
            if isinstance(name, int):
                os.fchown(name, uid, gid)
            else:
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.spend(ENTRY_COST)
        parts = self._parts(m.name, m.name)
        if not parts:
            self.dirs[()] = _DirMeta.of(m)
            return
        pfd = self._dir(parts[:-1])
        name = parts[-1]
        try:
            if name == OPAQUE_MARKER:
                os.setxattr(pfd, OPAQUE, b"y")
            elif name.startswith(WHITEOUT):
                hidden = name[len(WHITEOUT) :]
                if hidden in ("", ".", ".."):  # would remove the directory itself, or the one above the layer
                    raise LayerError(f"{self.what}: {m.name!r} whites out {hidden!r}, not a name; refusing the layer")
                self._clear(pfd, hidden, keep_dir=False)
                os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
            elif m.isdir():
                self._clear(pfd, name, keep_dir=True)
                with contextlib.suppress(FileExistsError):  # an earlier entry of this layer made it
                    os.mkdir(name, 0o700, dir_fd=pfd)
                if parts not in self.dirs and len(self.dirs) >= MAX_DIRECTORIES:
                    raise LayerError(f"{self.what} has more than {MAX_DIRECTORIES} directories; refusing the layer")
                self.dirs[parts] = _DirMeta.of(m)
            elif m.isreg():
                self._clear(pfd, name, keep_dir=False)
                fd = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
                )
                try:
                    self._write(fd, tf, m)
                    self._owner(m.uid, m.gid, fd, None)
                    os.fchmod(fd, m.mode & 0o7777)
                    _set_xattrs(fd, _xattrs(m))
                    os.utime(fd, ns=(int(m.mtime * 1e9),) * 2)
                finally:
                    os.close(fd)
            elif m.issym():
                self._clear(pfd, name, keep_dir=False)
                os.symlink(m.linkname, name, dir_fd=pfd)
                self._owner(m.uid, m.gid, name, pfd)
                os.utime(name, ns=(int(m.mtime * 1e9),) * 2, dir_fd=pfd, follow_symlinks=False)
            elif m.islnk():
                src = self._parts(m.linkname, f"{m.name} -> {m.linkname}")
                if not src:
                    raise LayerError(f"{self.what}: hard link {m.name!r} points at the root; refusing the layer")
                sfd = self._dir(src[:-1], create=False)
                try:
                    self._clear(pfd, name, keep_dir=False)
                    os.link(src[-1], name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError as exc:
                    raise LayerError(
                        f"{self.what}: hard link {m.name!r} points at {m.linkname!r}, which is not in this layer"
                    ) from exc
                finally:
                    os.close(sfd)
            elif m.isfifo():
                self._clear(pfd, name, keep_dir=False)
                os.mkfifo(name, m.mode & 0o777, dir_fd=pfd)
            else:
                self.skipped += 1  # device nodes: a sandbox gets its own /dev
        finally:
            os.close(pfd)

    def finish(self) -> None:
        if self.ids is not None and () not in self.dirs:
            os.fchown(self.root, *self.ids.root)  # the layer's top is / inside: root's
        # Directory modes last, deepest first: a read-only directory must not stop its own filling.
        for parts in sorted(self.dirs, key=len, reverse=True):
            m = self.dirs[parts]
            fd = self._dir(parts, create=False)
            try:
                self._owner(m.uid, m.gid, fd, None)
                os.fchmod(fd, m.mode & 0o7777)
                _set_xattrs(fd, m.xattrs)
                os.utime(fd, ns=(int(m.mtime * 1e9),) * 2)
            finally:
                os.close(fd)


def unpack_layer(
    blob: Path | IO[bytes], dest: Path, what: str, *, ids: IdMap | None, max_size: int = MAX_UNPACKED
) -> Unpacked:
    """Unpack a layer into the new directory ``dest``: ``blob`` is a tarball file (plain, gzip or
    zstd) or a stream of the plain tar (read to its end).

    Returns the entries skipped (device nodes) and the tar's digest. Raises :class:`LayerError`
    for a layer that tries to escape its root, is not a tar archive, or writes more than
    ``max_size`` bytes (4 KiB counted per entry).
    """
    unpacker = _Unpacker(dest, what, ids, max_size)
    try:
        with blob.open("rb") if isinstance(blob, Path) else contextlib.nullcontext(blob) as raw:
            try:
                stream = _Hashing(_open_stream(raw, what) if isinstance(blob, Path) else raw)
                with bounded_tar(stream, what, stream=True, spend=unpacker.spend) as tf:
                    for member in members(tf):
                        unpacker.add(tf, member)
                diff_id = stream.drain()
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise LayerError(f"{what} is not a valid (compressed) tar archive: {exc}") from exc
        unpacker.finish()
    except OSError as exc:
        if isinstance(exc, SandboxError):
            raise
        raise LayerError(f"{what}: unpacking failed: {exc}") from exc
    finally:
        unpacker.close()
    return Unpacked(unpacker.skipped, diff_id)
