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
import tarfile
import textwrap
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pytest_sandbox import ConfigError, Image, RegistryError
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
    import pytest_sandbox.store as store_module

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
