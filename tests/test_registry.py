"""Registry images on the local engine, pulled from a real registry (Debian's docker-registry, the
CNCF distribution registry) on 127.0.0.1, holding images pushed there by skopeo.

The main test image stacks a Debian layer (the mmdebstrap rootfs the other tests build) under an
application layer with whiteouts, an opaque directory, links and modes; others are a
multi-platform index, an index without this platform, a tag that moves, a corrupted blob, and
layers that try to write outside their root.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import secrets
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_sandbox import ConfigError, Image, Snapshot, SnapshotBuildError
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.oci import Reference, RegistryConfig
from tests.conftest import start_registry
from tests.oci import OCI_LAYER, Entry, Layout, layer, push

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install skopeo)"
)


@dataclass(frozen=True)
class Images:
    registry: str
    base: str  # debian + app layer
    debian_digest: str  # the Debian layer's digest
    debian_blob: Path  # and its gzip tarball


def _debian_layer(layout: Layout, debian: Snapshot, backend: LocalBackend, work: Path) -> dict[str, object]:
    blob = work / "debian.tar.gz"
    owner = ["--owner=0", "--group=0"] if os.geteuid() != 0 else []
    src = backend.store.layer_path(debian.layers[0])
    with blob.open("wb") as out:
        tar = subprocess.Popen(
            ["tar", "-C", str(src), "--numeric-owner", *owner, "-cf", "-", "."], stdout=subprocess.PIPE
        )
        subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out, check=True)
        assert tar.wait() == 0
    return layout.blob_file(blob, OCI_LAYER)


APP = layer(
    Entry("app", "dir", mode=0o755),
    Entry("app/hello.sh", data=b"#!/bin/sh\necho hello from the registry\n", mode=0o755),
    Entry("app/link", "symlink", link="hello.sh"),
    Entry("app/hard", "hardlink", link="app/hello.sh"),
    Entry("app/ro", "dir", mode=0o555),
    Entry("app/ro/inside", data=b"read only dir\n"),
    Entry("app/owned", data=b"x", uid=1234),
    Entry("etc/.wh.issue"),  # removes Debian's /etc/issue
    Entry("usr/share/doc/.wh..wh..opq"),  # hides every doc below
    Entry("usr/share/doc/only-this", data=b"the one doc\n"),
)


@pytest.fixture(scope="session")
def images(registry: str, debian: Snapshot, backend: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("oci")
    layout = Layout(work / "layout")
    deb = _debian_layer(layout, debian, backend, work)
    env = ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=registry"]
    base = layout.image([deb, layout.blob(APP, OCI_LAYER)], env=env, workdir="/app")
    layout.tag("base", base)
    push(layout, "base", f"{registry}/psb/base:1")
    digest = str(deb["digest"])
    return Images(registry, f"{registry}/psb/base:1", digest, layout.root / "blobs" / "sha256" / digest[7:])


def _tiny(layout: Layout, text: str, arch: str = "amd64") -> dict[str, object]:
    return layout.image([layout.blob(layer(Entry("which", data=text.encode())), OCI_LAYER)], arch=arch)


def test_multi_layer_image_with_whiteouts_links_modes_and_config(backend: LocalBackend, images: Images) -> None:
    snap = backend.build(Image.from_registry(images.base))
    assert snap.workdir == "/app" and snap.environment["APP_MODE"] == "registry"
    with backend.create(snap) as sb:
        assert sb.exec("./hello.sh").check().stdout == "hello from the registry\n"
        assert sb.exec("readlink link; ./link").stdout == "hello.sh\nhello from the registry\n"
        assert sb.exec("stat -c %i hello.sh hard | uniq | wc -l").stdout.strip() == "1"  # one inode
        assert sb.exec("stat -c %a ro hello.sh").stdout == "555\n755\n"
        assert sb.fs.read_text("/app/ro/inside") == "read only dir\n"
        owner = "1234" if os.geteuid() == 0 else "0"  # rootless, every file is the caller's: root inside
        assert sb.exec("stat -c %u owned").stdout.strip() == owner
        assert not sb.fs.exists("/etc/issue") and sb.fs.exists("/etc/debian_version")
        assert sb.fs.listdir("/usr/share/doc") == ["only-this"]
        assert sb.exec("python3 -c 'print(6 * 7)'").check().stdout == "42\n"  # from the Debian layer
        assert sb.exec("echo $APP_MODE").stdout == "registry\n"


def test_layers_are_cached_by_digest_and_shared_between_images(
    backend: LocalBackend, images: Images, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "layout")
    deb_dir = backend.store.layer_path("oci-" + images.debian_digest[7:39])
    backend.build(Image.from_registry(images.base))
    assert deb_dir.is_dir()
    # A second image on the same Debian layer: only its own small layer is fetched.
    shutil.copyfile(images.debian_blob, layout.root / "blobs" / "sha256" / images.debian_digest[7:])
    deb = {"mediaType": OCI_LAYER, "digest": images.debian_digest, "size": images.debian_blob.stat().st_size}
    tag = secrets.token_hex(3)
    other = layout.image([deb, layout.blob(layer(Entry("second", data=tag.encode())), OCI_LAYER)])
    layout.tag(tag, other)
    push(layout, tag, f"{images.registry}/psb/second:{tag}")
    logs: list[str] = []
    snap = backend.build(Image.from_registry(f"{images.registry}/psb/second:{tag}"), on_log=logs.append)
    assert snap.layers[0] == deb_dir.name
    assert sum("layer " in line for line in logs) == 1, logs  # the shared Debian layer was not fetched again
    with backend.create(snap) as sb:
        assert sb.fs.read_text("/second") == tag and sb.fs.exists("/etc/debian_version")


def test_multi_platform_index_gives_this_hosts_image(backend: LocalBackend, registry: str, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.tag("multi", _tiny(layout, "arm64", arch="arm64"), _tiny(layout, "amd64"), _tiny(layout, "s390x", "s390x"))
    layout.tag("armonly", _tiny(layout, "arm64", arch="arm64"), _tiny(layout, "ppc64le", arch="ppc64le"))
    tag = secrets.token_hex(3)
    push(layout, "multi", f"{registry}/psb/multi:{tag}")
    push(layout, "armonly", f"{registry}/psb/armonly:{tag}")
    snap = backend.build(Image.from_registry(f"{registry}/psb/multi:{tag}"))
    assert backend.store.layer_path(snap.layers[0]).joinpath("which").read_text() == "amd64"
    with pytest.raises(SnapshotBuildError, match=r"no image for this platform \(linux/amd64\); it has: linux/arm64"):
        backend.build(Image.from_registry(f"{registry}/psb/armonly:{tag}"))


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc, addr = start_registry(tmp_path / "registry")
    yield proc, addr
    proc.kill()
    proc.wait()


def test_moved_tag_gives_new_key_and_pinned_digest_needs_no_network(
    backend: LocalBackend, own_registry: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    proc, reg = own_registry
    layout = Layout(tmp_path / "layout")
    layout.tag("v1", _tiny(layout, "one"))
    layout.tag("v2", _tiny(layout, "two"))
    ref = f"{reg}/psb/moving:latest"

    def content(snap: Snapshot) -> str:
        return backend.store.layer_path(snap.layers[0]).joinpath("which").read_text()

    push(layout, "v1", ref)
    first = backend.build(Image.from_registry(ref))
    push(layout, "v2", ref)  # the tag moves
    second = backend.build(Image.from_registry(ref))
    assert first.key != second.key and (content(first), content(second)) == ("one", "two")
    digest = second.base["image"].split("@")[1]
    pinned = Image.from_registry(f"{reg}/psb/moving@{digest}")
    warm = backend.build(pinned)
    proc.kill()  # the registry is gone: the pinned image still builds from the cache
    proc.wait()
    assert backend.build(pinned).key == warm.key and content(warm) == "two"
    logs: list[str] = []
    offline = backend.build(Image.from_registry(ref), on_log=logs.append)
    assert offline.key == second.key  # the tag's last resolution, and the log says so
    assert any("cannot reach" in line and digest in line for line in logs), logs


def test_corrupted_blob_is_refused_and_nothing_is_kept(
    backend: LocalBackend, own_registry: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    _, reg = own_registry
    layout = Layout(tmp_path / "layout")
    payload = layer(Entry("data", data=secrets.token_bytes(4096)))
    desc = layout.blob(payload, OCI_LAYER)
    layout.tag("c", layout.image([desc]))
    push(layout, "c", f"{reg}/psb/corrupt:1")
    hexd = desc["digest"][7:]  # type: ignore[index]
    stored = tmp_path / "registry" / "data" / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    assert stored.read_bytes() == payload
    stored.write_bytes(payload[:-10] + b"0123456789")  # same size, different bytes
    with pytest.raises(SnapshotBuildError, match="does not match its digest") as info:
        backend.build(Image.from_registry(f"{reg}/psb/corrupt:1"))
    assert "Nothing of it was kept" in str(info.value)
    assert not backend.store.layer_path("oci-" + hexd[:32]).exists()
    # The pull's work in progress is t/<owner>.<id>; t/<owner>.x<id> are removals of earlier tests'
    # sandboxes, which run in the background (one can start meanwhile, when a sandbox object goes).
    owner = backend.store.owner
    left = [p.name for p in (backend.store.root / "t").iterdir() if p.name.startswith(f"{owner}.")]
    assert not [name for name in left if not name.startswith(f"{owner}.x")]


def test_unknown_image_missing_tag_unreachable_registry(backend: LocalBackend, images: Images) -> None:
    with pytest.raises(SnapshotBuildError, match="does not exist; check the name"):
        backend.build(Image.from_registry(f"{images.registry}/psb/no-such-image:1"))
    with pytest.raises(SnapshotBuildError, match=r"has no tag 'nope'; check the tag \(tags there include: 1\)"):
        backend.build(Image.from_registry(f"{images.registry}/psb/base:nope"))
    with pytest.raises(SnapshotBuildError, match=r"cannot reach the registry 127\.0\.0\.1:9"):
        backend.build(Image.from_registry("127.0.0.1:9/psb/base:1"))
    with pytest.raises(ConfigError, match="not a valid repository name"):  # refused before anything runs
        Image.from_registry("Psb/Base")


ESCAPES = {
    "absolute path": (Entry("/etc/evil", data=b"x"), "absolute path"),
    "dot-dot path": (Entry("../../evil", data=b"x"), "climbs out"),
    "hard link out": (Entry("evil", "hardlink", link="../../../etc/passwd"), "climbs out"),
    "write through a symlink": (Entry("x", "symlink", link="/tmp"), "symlink or a file"),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_layers_that_write_outside_their_root_are_refused(
    backend: LocalBackend, registry: str, tmp_path: Path, case: str
) -> None:
    entry, message = ESCAPES[case]
    entries = [entry, Entry("x/pwned", data=b"x")] if case == "write through a symlink" else [entry]
    layout = Layout(tmp_path / "layout")
    desc = layout.blob(layer(*entries), OCI_LAYER)
    tag = secrets.token_hex(3)
    layout.tag(tag, layout.image([desc]))
    push(layout, tag, f"{registry}/psb/evil:{tag}")
    with pytest.raises(SnapshotBuildError, match=message):
        backend.build(Image.from_registry(f"{registry}/psb/evil:{tag}"))
    assert not backend.store.layer_path("oci-" + str(desc["digest"])[7:39]).exists()
    assert not (tmp_path.parent / "evil").exists() and not Path("/tmp/pwned").exists()


def test_credentials_from_the_docker_config_file(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crypt = pytest.importorskip("crypt", reason="htpasswd needs bcrypt from the crypt module")
    (tmp_path / "htpasswd").write_text(f"psb:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
    proc, reg = start_registry(tmp_path / "registry", auth)
    try:
        layout = Layout(tmp_path / "layout")
        layout.tag("p", _tiny(layout, "private"))
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds=psb:s3cret",
                f"oci:{layout.root}:p",
                f"docker://{reg}/psb/private:1",
            ],
            check=True,
            capture_output=True,
        )
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
        backend._bases._registry_client = None  # read the configuration again
        with pytest.raises(SnapshotBuildError, match=f"{reg} requires credentials.*docker login"):
            backend.build(Image.from_registry(f"{reg}/psb/private:1"))
        (tmp_path / "docker").mkdir()
        token = base64.b64encode(b"psb:s3cret").decode()
        (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {reg: {"auth": token}}}))
        backend._bases._registry_client = None
        snap = backend.build(Image.from_registry(f"{reg}/psb/private:1"))
        assert backend.store.layer_path(snap.layers[0]).joinpath("which").read_text() == "private"
    finally:
        backend._bases._registry_client = None
        proc.kill()
        proc.wait()


def test_docker_hub_names_go_through_a_configured_mirror(
    backend: LocalBackend, registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path / "layout")
    layout.tag("m", _tiny(layout, "from the mirror"))
    tag = secrets.token_hex(3)
    push(layout, "m", f"{registry}/library/mirrored:{tag}")
    monkeypatch.setenv("PYTEST_SANDBOX_REGISTRY_MIRRORS", f"http://{registry}")
    backend._bases._registry_client = None
    try:
        snap = backend.build(Image.from_registry(f"mirrored:{tag}"))  # docker.io/library/mirrored
        assert backend.store.layer_path(snap.layers[0]).joinpath("which").read_text() == "from the mirror"
    finally:
        backend._bases._registry_client = None


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
        ("ubuntu", "docker.io/library/ubuntu:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("index.docker.io/library/alpine", "docker.io/library/alpine:latest"),
        ("ghcr.io/owner/repo:1.0", "ghcr.io/owner/repo:1.0"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("localhost/app:dev", "localhost/app:dev"),
        ("127.0.0.1:5000/a/b@sha256:" + "a" * 64, "127.0.0.1:5000/a/b@sha256:" + "a" * 64),
    ],
)
def test_references_are_normalised_as_docker_does(ref: str, expected: str) -> None:
    assert str(Reference.parse(ref)) == expected


def test_loopback_registries_are_plain_http_others_https(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_INSECURE_REGISTRIES", "build.internal:5000")
    monkeypatch.setenv("PYTEST_SANDBOX_DOCKER_DAEMON_JSON", "/nonexistent")
    monkeypatch.delenv("PYTEST_SANDBOX_REGISTRY_MIRRORS", raising=False)
    cfg = RegistryConfig.from_environment()
    assert cfg.endpoints("127.0.0.1:5000") == ["http://127.0.0.1:5000"]
    assert cfg.endpoints("localhost:5000") == ["http://localhost:5000"]
    assert cfg.endpoints("127.8.9.1") == ["http://127.8.9.1"]
    assert cfg.endpoints("build.internal:5000") == ["http://build.internal:5000"]
    assert cfg.endpoints("ghcr.io") == ["https://ghcr.io"]
    assert cfg.endpoints("docker.io") == ["https://registry-1.docker.io"]


class _TokenFront(http.server.ThreadingHTTPServer):
    """Bearer-token authentication in front of the real registry, as Docker Hub and ghcr.io do it:
    /v2/ answers 401 with a challenge, /token issues a token (for anyone, or only with Basic
    credentials when ``password`` is set), and requests with the token are passed through."""

    def __init__(self, upstream: str, password: str | None) -> None:
        self.upstream, self.password = upstream, password
        self.tokens: set[str] = set()
        self.scopes: list[str] = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/token":
                    query = dict(urllib.parse.parse_qsl(url.query))
                    expected = "Basic " + base64.b64encode(f"psb:{front.password}".encode()).decode()
                    if front.password and self.headers.get("Authorization") != expected:
                        self.send_response(401)
                        self.end_headers()
                        return
                    front.scopes.append(query.get("scope", ""))
                    token = secrets.token_hex(8)
                    front.tokens.add(token)
                    return self._reply(200, json.dumps({"token": token}).encode(), {})
                if self.headers.get("Authorization", "").removeprefix("Bearer ") not in front.tokens:
                    name = url.path.split("/")[2:4]
                    realm = f"http://{self.headers['Host']}/token"
                    challenge = f'Bearer realm="{realm}",service="psb-test",scope="repository:{"/".join(name)}:pull"'
                    return self._reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
                req = urllib.request.Request(f"http://{front.upstream}{self.path}", headers=dict(self.headers))
                try:
                    with urllib.request.urlopen(req) as resp:
                        self._reply(resp.status, resp.read(), dict(resp.headers))
                except urllib.error.HTTPError as err:
                    self._reply(err.code, err.read(), dict(err.headers))

            def _reply(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("password", [None, "t0ken-pw"], ids=["anonymous", "with-credentials"])
def test_bearer_token_flow(
    backend: LocalBackend, registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str | None
) -> None:
    layout = Layout(tmp_path / "layout")
    tag = secrets.token_hex(3)
    layout.tag(tag, _tiny(layout, f"behind a token {tag}"))
    push(layout, tag, f"{registry}/psb/tokened:{tag}")
    front = _TokenFront(registry, password)
    monkeypatch.delenv("DOCKER_AUTH_CONFIG", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    backend._bases._registry_client = None
    try:
        ref = f"{front.address}/psb/tokened:{tag}"
        if password:
            with pytest.raises(SnapshotBuildError, match="requires credentials for psb/tokened"):
                backend.build(Image.from_registry(ref))
            auth = base64.b64encode(f"psb:{password}".encode()).decode()
            monkeypatch.setenv("DOCKER_AUTH_CONFIG", json.dumps({"auths": {front.address: {"auth": auth}}}))
            backend._bases._registry_client = None
        snap = backend.build(Image.from_registry(ref))
        assert backend.store.layer_path(snap.layers[0]).joinpath("which").read_text() == f"behind a token {tag}"
        assert "repository:psb/tokened:pull" in front.scopes
    finally:
        backend._bases._registry_client = None
        front.shutdown()
        front.server_close()
