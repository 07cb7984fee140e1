"""Trees, archives and registries built to break the data path: directories deeper than Python
recurses, sparse files and sparse tar members of terabytes, endless registry answers, snapshot
keys that climb out of the store, and whiteouts of ``..``. Each must end in a clear error or in
a correct result, never in a RecursionError, a filled disk or memory, or a write outside the
store. The cases that would fill the disk or memory if the fix regressed run in a child process
whose file size and address space are capped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import pytest_sandbox.store as store_module
from pytest_sandbox import ConfigError, Image, RegistryError, SandboxError
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.engine.unpack import LayerError, unpack_layer
from pytest_sandbox.store import Store, rmtree
from tests.conftest import needs_tool, run_py
from tests.oci import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Entry, layer

MiB = 1 << 20
DEPTH = 1500  # deeper than Python's default recursion limit (1000)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[LocalBackend]:
    """A backend with a store of its own, so what a case leaves behind is its own."""
    with LocalBackend(tmp_path / "cache") as b:
        yield b
    rmtree(tmp_path / "cache")  # what a failing case left may be deeper than pytest's clean-up goes


def snapshot_archive(path: Path, layers: list[bytes], key: str, parent: str = "") -> Path:
    """An OCI image layout archive of one pytest-sandbox snapshot over these gzip layer blobs."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes, media: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    descs = [add(blob, OCI_LAYER) for blob in layers]
    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() for blob in layers]
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    annotations = {
        "org.pytest-sandbox.key": key,
        "org.pytest-sandbox.parent": parent,
        "org.pytest-sandbox.snapshot": json.dumps({"env": [], "workdir": "/"}),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": add(json.dumps(config).encode(), OCI_CONFIG),
        "layers": descs,
        "annotations": annotations,
    }
    index = {"schemaVersion": 2, "manifests": [add(json.dumps(manifest).encode(), OCI_MANIFEST)]}
    with tarfile.open(path, "w") as tf:
        for name, data in [
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for digest, data in blobs.items():
            info = tarfile.TarInfo(f"blobs/sha256/{digest}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def in_store(b: LocalBackend) -> list[str]:
    """Records, layers and work in progress in ``b``'s store."""
    root = b.store.root
    return sorted(str(p.relative_to(root)) for sub in ("s", "l", "t") for p in (root / sub).iterdir())


def deep_tree(top: Path, depth: int) -> None:
    """``top/d/d/.../d/f`` ``depth`` levels down, the last directory without any permission (made
    by fds: its path is longer than the kernel takes in one piece)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.fchmod(fd, 0)
    os.close(fd)


# -- 1. trees deeper than Python recurses ------------------------------------------------------
def test_a_deep_tree_is_snapshotted_forked_downloaded_and_collected(fresh: LocalBackend, tmp_path: Path) -> None:
    host = fresh.build(Image.host())
    with fresh.create(host) as sb:
        sb.exec(
            f"cd /root && i=0; while [ $i -lt {DEPTH} ]; do mkdir d && cd d || exit 1; i=$((i+1)); done; echo deep > f"
        ).check()
        snap = sb.snapshot()
    fresh.store.flush()
    assert [p for p in in_store(fresh) if p.startswith("t/")] == []
    with fresh.create(snap) as sb:
        assert sb.exec(f"cd /root/{'d/' * 700} && cat {'d/' * (DEPTH - 700)}f").check().stdout == "deep\n"
        sb.fs.download("/root", tmp_path / "root")
    try:
        fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(DEPTH):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("f", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"deep\n"
        os.close(fd)
    finally:
        rmtree(tmp_path / "root")  # deeper than pytest's own clean-up goes
    fresh.store.flush()
    fresh.remove_snapshot(snap)
    assert not [p for p in in_store(fresh) if p.startswith("l/") and p[2:] not in host.layers]


def test_gc_deletes_a_deep_stray_tree_and_goes_on_after_a_failing_entry(
    fresh: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = fresh.store.root / "t"
    for n in range(2):  # the work in progress of a process that died
        (t / f"deadbeef.x{n}").mkdir()
        deep_tree(t / f"deadbeef.x{n}", 3000)
    assert fresh.gc() == 2
    assert list(t.iterdir()) == []

    for n in range(2):
        (t / f"deadbeef.y{n}").mkdir()
    real = store_module.rmtree_at

    def failing(pfd: int, name: str) -> None:
        if name == "deadbeef.y0":
            raise PermissionError(1, "Operation not permitted")
        real(pfd, name)

    monkeypatch.setattr(store_module, "rmtree_at", failing)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert fresh.store.gc() == 1
    assert [p.name for p in t.iterdir()] == ["deadbeef.y0"]
    assert any("deadbeef.y0" in str(w.message) and "rm -rf" in str(w.message) for w in said), said


def test_a_sessions_own_sweep_does_not_wait_out_another_process_publishing(tmp_path: Path) -> None:
    """A pull holds the store's shared lock for its whole download: a session's sweep at its end
    (wait=False) gives up after a grace and leaves the leftovers to the next one; gc() and the
    CLI's gc still wait, and sweep once the other process is done."""
    store = Store(tmp_path / "c")
    (store.root / "t" / "deadbeef.x1").mkdir()  # work in progress of a process that died
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()",
         str(store.root / "gc.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert store.gc(wait=False) == 0
        assert (store.root / "t" / "deadbeef.x1").is_dir()
        results: list[int] = []
        waiting = threading.Thread(target=lambda: results.append(store.gc()))
        waiting.start()
        waiting.join(timeout=3 * store_module.GC_GRACE)
        assert waiting.is_alive() and results == []  # it waits for as long as the lock is held
    finally:
        holder.communicate("", timeout=30)
    waiting.join(timeout=60)
    assert results == [1]
    assert not (store.root / "t" / "deadbeef.x1").exists()


def test_an_archive_with_a_deep_layer_imports_and_is_collected(fresh: LocalBackend, tmp_path: Path) -> None:
    deep = "/".join(["d"] * DEPTH)
    archive = snapshot_archive(tmp_path / "deep.tar", [layer(Entry(f"{deep}/f", data=b"x"))], "e" * 64)
    (snap,) = fresh.import_archive(archive)
    assert [p for p in in_store(fresh) if p.startswith("t/")] == []
    fresh.remove_snapshot(snap)
    assert fresh.gc() >= 0
    assert in_store(fresh) == []


# -- 2. sparse files and sparse tar members ----------------------------------------------------
# A hole costs nothing, so these sizes are what a regression would write: kept small enough that
# it fails the test without filling the disk (RLIMIT_FSIZE cannot bound it: it caps a file's
# length, holes included).
SPARSE = 256 * MiB


def test_a_sparse_file_is_snapshotted_as_holes(fresh: LocalBackend) -> None:
    with fresh.create(fresh.build(Image.host())) as sb:
        sb.exec(f"truncate -s {SPARSE} /big && printf x >> /big").check()
        snap = sb.snapshot()
    st = os.stat(fresh.store.layer_path(snap.layers[-1]) / "big")
    assert st.st_size == SPARSE + 1
    assert st.st_blocks * 512 < MiB, st


def sparse_tar(tmp_path: Path, fmt: str) -> Path:
    """A tar of one file of SPARSE bytes with one of data in the middle (GNU tar's sparse members)."""
    needs_tool("tar", "apt-get install tar")
    work = tmp_path / f"sparse-{fmt}"
    work.mkdir()
    with (work / "big").open("wb") as f:
        f.truncate(SPARSE)
        f.seek(SPARSE // 2)
        f.write(b"x")
    out = tmp_path / f"{fmt}.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", str(work), "-cf", str(out), "big"], check=True)
    shutil.rmtree(work)
    assert out.stat().st_size < MiB
    return out


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_a_sparse_tar_member_is_unpacked_as_holes(tmp_path: Path, fmt: str) -> None:
    blob = sparse_tar(tmp_path, fmt)
    unpack_layer(blob, tmp_path / "out", "a layer", ids=None)
    big = tmp_path / "out" / "big"
    st = big.stat()
    assert st.st_size == SPARSE and st.st_blocks * 512 < MiB, st
    with big.open("rb") as f:
        f.seek(SPARSE // 2 - 1)
        assert f.read(3) == b"\0x\0"


def test_unpacking_stops_at_its_budget(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match=r"unpacks to more than 4 KiB .* too large"):
        unpack_layer(sparse_tar(tmp_path, "gnu"), tmp_path / "a", "a layer", ids=None, max_size=4096)
    many = tmp_path / "many.tar.gz"
    many.write_bytes(layer(*(Entry(f"f{i}") for i in range(100))))
    with pytest.raises(LayerError, match="too large"):
        unpack_layer(many, tmp_path / "b", "a layer", ids=None, max_size=50 * 4096)


# -- 3. registry answers without end -----------------------------------------------------------
class _EndlessRegistry:
    """A registry whose every answer goes on for ever: a manifest, an error body, a token, a blob."""

    def __init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _endless(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                chunk = b"A" * MiB
                try:
                    self.wfile.write(b'{"schemaVersion": 2, "x": "')
                    while not outer.stop.is_set():
                        self.wfile.write(chunk)
                except OSError:
                    pass

            def do_GET(self) -> None:
                if self.path == "/v2/":
                    self.send_response(200)
                    self.end_headers()
                elif self.path.startswith("/token"):
                    self._endless(200, {"Content-Type": "application/json"})
                elif self.path.startswith("/v2/auth/") and "Authorization" not in self.headers:
                    realm = f"http://127.0.0.1:{outer.port}/token"
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="x"')
                    self.end_headers()
                elif self.path.startswith("/v2/error/"):
                    self._endless(500, {})
                else:
                    self._endless(200, {"Content-Type": OCI_MANIFEST})

        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()


@pytest.mark.parametrize(
    ("repo", "call"),
    [
        ("manifest", "c.manifest(ref, 'tag')"),
        ("error", "c.manifest(ref, 'tag')"),
        ("auth", "c.manifest(ref, 'tag')"),
        ("config", "c.blob(ref, 'sha256:' + '0' * 64)"),
        ("blob", "c.download(ref, 'sha256:' + '0' * 64, 1000, io.BytesIO())"),
    ],
)
def test_an_endless_registry_answer_is_refused_with_bounded_memory(tmp_path: Path, repo: str, call: str) -> None:
    registry = _EndlessRegistry()
    try:
        code = f"""
            import io, resource
            resource.setrlimit(resource.RLIMIT_AS, ({1 << 30}, {1 << 30}))
            from pytest_sandbox import RegistryError
            from pytest_sandbox.oci import Reference, RegistryClient
            c = RegistryClient()
            ref = Reference.parse("127.0.0.1:{registry.port}/{repo}:tag")
            try:
                {call}
                print("OUTCOME returned")
            except RegistryError as exc:
                print("OUTCOME RegistryError", exc)
            except BaseException as exc:
                print("OUTCOME", type(exc).__name__, exc)
        """
        out = run_py(textwrap.dedent(code), tmp_path, timeout=60)
    finally:
        registry.close()
    lines = [x for x in out.stdout.splitlines() if x.startswith("OUTCOME ")]
    assert lines, out.stdout + out.stderr
    if repo == "error":  # only its start is read; the answer is the registry's 500
        assert lines[0].startswith("OUTCOME RegistryError") and "answered 500" in lines[0], lines
    else:
        assert lines[0].startswith("OUTCOME RegistryError") and (
            "larger than" in lines[0] or "more than" in lines[0]
        ), lines


# -- 4. keys that are paths --------------------------------------------------------------------
@pytest.mark.parametrize("where", ["key", "parent"])
def test_a_key_that_climbs_out_of_the_store_is_refused_before_use(
    fresh: LocalBackend, tmp_path: Path, where: str
) -> None:
    target = tmp_path / "escaped" / "deep" / "dir"
    climb = "../" * 30 + str(target).lstrip("/")
    key, parent = (climb, "") if where == "key" else ("a" * 64, climb)
    archive = snapshot_archive(tmp_path / "evil.tar", [layer(Entry("hello.txt", data=b"hi"))], key, parent)
    with pytest.raises(RegistryError, match=f"{where} annotation .* is not a snapshot key"):
        fresh.import_archive(archive)
    assert not (tmp_path / "escaped").exists()
    assert in_store(fresh) == []


def test_the_store_refuses_a_malformed_key_for_a_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    for key in ("../../x", "", ".hidden", "a/b", "a\0b"):
        with pytest.raises(ConfigError, match="is not valid"):
            store.build_lock(key)
    assert sorted(p.name for p in (store.root / "k").iterdir()) == []


# -- 5. whiteouts of '.' and '..' --------------------------------------------------------------
@pytest.mark.parametrize("name", [".wh...", "x/.wh...", ".wh..", ".wh."])
def test_a_whiteout_of_dot_or_dotdot_is_refused(fresh: LocalBackend, tmp_path: Path, name: str) -> None:
    good = snapshot_archive(tmp_path / "good.tar", [layer(Entry("etc/good.txt", data=b"good"))], "a" * 64)
    (kept,) = fresh.import_archive(good)
    before = in_store(fresh)
    evil = layer(Entry("x", kind="dir", mode=0o755), Entry("x/f", data=b"1"), Entry(name))
    with pytest.raises(LayerError, match="whites out"):
        fresh.import_archive(snapshot_archive(tmp_path / "evil.tar", [evil], "b" * 64))
    assert in_store(fresh) == before
    assert fresh.store.layer_ok(kept.layers[-1], full=True)


# -- 6. archive headers built to be held whole -------------------------------------------------
def _block(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _member(name: str = "f", data: bytes = b"x") -> bytes:
    return _header(name, len(data), tarfile.REGTYPE) + _block(data)


def _repeat(piece: bytes, size: int) -> Iterator[bytes]:
    """``size`` bytes of ``piece`` over and over, a MiB at a time (the test never holds them)."""
    chunk = piece * (MiB // len(piece))
    while size > 0:
        yield chunk[: min(size, len(chunk))]
        size -= len(chunk)
    yield b"\0" * (-size % 512 if size < 0 else 0)


def _extended(kind: bytes, size: int, piece: bytes) -> Iterator[bytes]:
    """One extended header of ``size`` bytes (its data made of ``piece``), then a real member."""
    yield _header("././@LongLink" if kind in (b"L", b"K") else "././@PaxHeader", size, kind)
    body = b"".join(_repeat(piece, size)) if size <= MiB else None
    if body is not None:
        yield _block(body)
    else:
        written = 0
        for chunk in _repeat(piece, size):
            written += len(chunk)
            yield chunk
        yield b"\0" * (-written % 512)
    yield _member()


HUGE = 300 * MiB


def _hostile_layers() -> dict[str, Callable[[], Iterator[bytes]]]:
    def pax() -> Iterator[bytes]:  # one PAX record of 300 MiB
        yield from _extended(tarfile.XHDTYPE, HUGE, b"x")

    def long_name() -> Iterator[bytes]:  # a GNU long name of 300 MiB
        yield from _extended(tarfile.GNUTYPE_LONGNAME, HUGE, b"d/")

    def chain() -> Iterator[bytes]:  # 100,000 long-name headers in a row: tarfile reads each by recursion
        for _ in range(100_000):
            yield _header("././@LongLink", 2, tarfile.GNUTYPE_LONGNAME) + _block(b"a\0")
        yield _member()

    def globals_() -> Iterator[bytes]:  # 600 global headers of 64 KiB of new names: kept, and copied per member
        for i in range(600):
            record = b"".join(f"{k:05d}.{i:05d}={'v' * 40}\n".encode() for k in range(1200))
            lines = b"".join(b"%d %s" % (len(r) + len(str(len(r))) + 1, r) for r in record.splitlines(True))
            yield _header("././@PaxHeader", len(lines), tarfile.XGLTYPE) + _block(lines)
            yield _member(f"f{i}")

    def sparse_map() -> Iterator[bytes]:  # a PAX 1.0 sparse map of 75 million numbers, read as a list
        pax = tarfile.TarInfo("f")
        pax.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1"}
        pax.size = HUGE
        yield pax.tobuf(format=tarfile.PAX_FORMAT)
        yield b"%d\n" % (HUGE // 4)
        yield from _repeat(b"0\n1\n", HUGE - 512)

    return {"pax": pax, "long name": long_name, "chain": chain, "globals": globals_, "sparse map": sparse_map}


CAPPED_UNPACK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from pathlib import Path
from pytest_sandbox.errors import SandboxError
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.engine.unpack import unpack_layer
try:
    if sys.argv[1] == "layer":
        unpack_layer(Path(sys.argv[2]), Path(sys.argv[3]), "a hostile layer", ids=None)
    else:
        with LocalBackend(sys.argv[3]) as b:
            b.import_archive(sys.argv[2])
    print("OUTCOME unpacked")
except SandboxError as exc:
    print("OUTCOME", type(exc).__name__, exc)
except BaseException as exc:
    print("OUTCOME crashed", type(exc).__name__, str(exc)[:200])
"""


@pytest.mark.parametrize("case", sorted(_hostile_layers()))
@pytest.mark.parametrize("where", ["layer", "archive"])
def test_archive_headers_are_bounded_and_refused_with_bounded_memory(tmp_path: Path, case: str, where: str) -> None:
    # Before: tarfile held a header of any size whole (a 270 KiB layer cost the runner +781 MiB),
    # recursed once per extended header, and kept every global header and sparse map entry.
    blob = tmp_path / ("layer.tar.gz" if where == "layer" else "archive.tar.gz")
    with gzip.open(blob, "wb", compresslevel=1) as out:
        for chunk in _hostile_layers()[case]():
            out.write(chunk)
        out.write(b"\0" * 1024)
    assert blob.stat().st_size < 32 * MiB  # small on the wire, built to be big in memory
    code = CAPPED_UNPACK.format(cap=512 * MiB)
    res = subprocess.run(
        [sys.executable, "-c", code, where, str(blob), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    outcome = next((x for x in res.stdout.splitlines() if x.startswith("OUTCOME ")), res.stderr[-2000:])
    expected = "LayerError" if where == "layer" else "RegistryError"
    assert outcome.startswith(f"OUTCOME {expected}"), outcome
    assert "headers" in outcome or "extended headers in a row" in outcome, outcome


def test_a_real_layers_headers_still_unpack(tmp_path: Path) -> None:
    """Long names, PAX records with xattrs and a global header, as real tools write them."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.pax_headers = {"comment": "made by a tool"}
        name = "/".join(["d" * 100] * 20) + "/f"  # 2 KB: a GNU or PAX long name
        info = tarfile.TarInfo(name)
        info.size = 2
        info.pax_headers = {"SCHILY.xattr.user.note": "kept"}
        tf.addfile(info, io.BytesIO(b"ok"))
    blob = tmp_path / "l.tar.gz"
    blob.write_bytes(gzip.compress(data.getvalue()))
    unpack_layer(blob, tmp_path / "out", "a layer", ids=None)
    assert (tmp_path / "out" / name).read_bytes() == b"ok"
    assert os.getxattr(tmp_path / "out" / name, "user.note") == b"kept"


# -- 7. ancestry that loops --------------------------------------------------------------------
def test_a_snapshot_that_is_its_own_parent_is_refused_at_import(fresh: LocalBackend, tmp_path: Path) -> None:
    # Before: Snapshot.lineage never returned for it, and export and push hung.
    key = "b" * 64
    archive = snapshot_archive(tmp_path / "loop.tar", [layer(Entry("hello.txt", data=b"hi"))], key, parent=key)
    with pytest.raises(RegistryError, match="its own ancestor"):
        fresh.import_archive(archive)
    assert fresh.store.get(key) is None


def test_a_stored_ancestry_loop_is_an_error_not_a_hang(fresh: LocalBackend, tmp_path: Path) -> None:
    a, b = "a" * 64, "c" * 64
    fresh.import_archive(snapshot_archive(tmp_path / "a.tar", [layer(Entry("a", data=b"a"))], a, parent=b))
    snap = fresh.store.get(a)
    assert snap is not None
    # a record altered on disk (or by an older version) to close the loop
    looped = replace(snap, key=b, parent=a)
    fresh.store.put(looped)
    with pytest.raises(SandboxError, match="ancestry loops back"):
        snap.lineage(fresh.store.get)
    with pytest.raises(SandboxError, match="ancestry loops back"):
        fresh.export(snap, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_many_processes_opening_one_new_cache_at_once_all_succeed(tmp_path: Path) -> None:
    """Workers that open the same new cache directory together race to make each directory on
    its way: the losers must go on with the one the winner made (CI: "cannot use cache directory
    ...: File exists")."""

    def open_it(where: Path, start: threading.Barrier, errors: list[BaseException]) -> None:
        start.wait()
        try:
            Store(where)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    for attempt in range(20):
        where = tmp_path / f"run{attempt}" / "a" / "b" / "c"
        start = threading.Barrier(8)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=open_it, args=(where, start, errors)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert (where / "v2" / "l").is_dir()
