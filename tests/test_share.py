"""Snapshots shared between machines through a real registry (Debian's docker-registry on
127.0.0.1) and through OCI image layout archives. Two cache directories stand for two machines:
A builds and pushes, B pulls (or runs with cache-from) and builds nothing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pytest_sandbox import ConfigError, RegistryError, Snapshot
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.oci import Reference, RegistryClient
from tests.conftest import DEBIAN, needs_tool, start_registry

# Modes, owners, a hard link, a symlink, an xattr, a deleted base file (a whiteout) and a
# directory replaced in a later step (an opaque directory).
FILES = (
    "mkdir -p /srv/app/gone /srv/opq && echo hi > /srv/app/f && (chown 1000:1001 /srv/app/f 2>/dev/null || true) && "
    "chmod 2750 /srv/app/f && ln /srv/app/f /srv/app/hard && ln -s f /srv/app/sym && "
    "touch /srv/opq/old && rm /etc/issue && python3 -c \"import os; os.setxattr('/srv/app/f', 'user.note', b'v')\""
)
STEP2 = "rm -rf /srv/opq && mkdir /srv/opq && touch /srv/opq/new && echo two > /srv/two"
IMAGE = DEBIAN.run(FILES).run(STEP2).env(SHARED="yes").workdir("/srv")
LOOK = (
    "stat -c '%n %a %u %g %h %F %N' /srv/app/* /srv/two; ls -A /srv/opq; ls /etc/issue 2>&1; echo $SHARED; pwd; "
    "python3 -c \"import os; print(os.getxattr('/srv/app/f', 'user.note'))\""
)


def look(backend: LocalBackend, snap: Snapshot) -> str:
    with backend.create(snap) as sb:
        return sb.exec(LOOK).check().stdout


@pytest.fixture
def machine_b(tmp_path: Path) -> Iterator[LocalBackend]:
    """Another machine: a cache directory of its own."""
    with LocalBackend(tmp_path / "machine-b") as b:
        yield b


@pytest.fixture(scope="module")
def pushed(backend: LocalBackend, debian: Snapshot, registry: str) -> tuple[str, Snapshot]:
    """IMAGE built on machine A (the session's cache) and pushed: (repository, snapshot)."""
    repo = f"{registry}/team/env"
    snap = backend.build(IMAGE)
    assert backend.push(snap, repo) == f"{repo}:{snap.key}"
    return repo, snap


def leftovers(b: LocalBackend) -> list[str]:
    """What a failed pull might have left in B's store: records, layers, work in progress."""
    root = b.store.root
    return sorted(str(p.relative_to(root)) for sub in ("s", "l", "t") for p in (root / sub).iterdir())


def test_machine_b_runs_what_a_pushed_without_building(
    backend: LocalBackend, pushed: tuple[str, Snapshot], machine_b: LocalBackend
) -> None:
    repo, snap = pushed
    lines: list[str] = []
    got = machine_b.build(IMAGE, cache_from=repo, on_log=lines.append)
    assert got.key == snap.key
    assert not [x for x in lines if x.startswith("[")], lines  # no step was built
    assert [x for x in lines if x.startswith("pulled ")] == [f"pulled {snap.short} from {repo}"]
    seen = look(machine_b, got)
    assert seen == look(backend, snap)
    assert "/srv/app/f 2750" in seen and "/srv/app/hard 2750" in seen and " 2 regular file" in seen
    assert "'/srv/app/sym' -> 'f'" in seen and "new\n" in seen and "old" not in seen
    assert "No such file" in seen and "yes\n/srv\nb'v'" in seen
    if os.geteuid() == 0:
        assert "/srv/app/f 2750 1000 1001" in seen
    # The next build on B finds it by key, with nothing to do and no registry.
    again: list[str] = []
    assert machine_b.build(IMAGE, on_log=again.append).key == snap.key and again == []


def test_pulled_layers_are_content_addressed_and_pushes_send_only_new_layers(
    backend: LocalBackend, pushed: tuple[str, Snapshot], machine_b: LocalBackend
) -> None:
    repo, snap = pushed
    machine_b.pull(f"{repo}:{snap.key}")
    child = IMAGE.run("echo child > /srv/child")
    lines: list[str] = []
    built = backend.build(child)
    backend.push(built, repo, on_log=lines.append)
    assert "1 layers sent" in lines[-1] and f"{len(snap.layers)} already there" in lines[-1], lines
    pulled: list[str] = []
    b_child = machine_b.pull(f"{repo}:{built.key}", on_log=pulled.append)
    layer_lines = [x for x in pulled if x.strip().startswith("layer ")]
    assert len(layer_lines) == 1, pulled  # the parent's layers were on B already
    with machine_b.create(b_child) as sb:
        assert sb.exec("cat /srv/child /srv/two").stdout == "child\ntwo\n"


def test_partial_reuse_builds_only_the_steps_not_pushed(
    backend: LocalBackend, pushed: tuple[str, Snapshot], machine_b: LocalBackend
) -> None:
    repo, _ = pushed
    longer = IMAGE.run("echo three > /srv/three")
    lines: list[str] = []
    snap = machine_b.build(longer, cache_from=repo, on_log=lines.append)
    headers = [x for x in lines if x.startswith("[")]
    assert headers == ["[5/5] RUN echo three > /srv/three"], lines
    with machine_b.create(snap) as sb:
        assert sb.exec("cat /srv/two /srv/three").stdout == "two\nthree\n"


def test_racing_workers_pull_once(pushed: tuple[str, Snapshot], tmp_path: Path) -> None:
    repo, _ = pushed
    code = (
        "import sys; from pytest_sandbox.backends.local import LocalBackend\n"
        "from tests.test_share import IMAGE\n"
        f"with LocalBackend({str(tmp_path / 'b')!r}) as b:\n"
        f"    b.build(IMAGE, cache_from={repo!r}, on_log=lambda l: print(l, flush=True))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("pulled ") for o in outs) == 1, outs
    assert not any("[" in o for o in outs), outs


def test_export_import_round_trip_and_other_tools_read_it(
    backend: LocalBackend, pushed: tuple[str, Snapshot], machine_b: LocalBackend, tmp_path: Path
) -> None:
    _, snap = pushed
    archive = backend.export(snap, tmp_path / "env.tar")
    keys = [s.key for s in machine_b.import_archive(archive)]
    assert keys[-1] == snap.key and len(keys) == 5  # the base and each of the four steps
    assert look(machine_b, machine_b.get_snapshot(snap.key)) == look(backend, snap)
    if shutil.which("skopeo"):
        out = subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{archive}:{snap.key}"], capture_output=True, text=True, check=True
        )
        assert len(json.loads(out.stdout)["Layers"]) == len(snap.layers)
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        tag = f"pytest-sandbox:{snap.key}"  # docker load names it as the docker backend would
        listed = subprocess.run(["docker", "images", "--format", "{{.Tag}}", "pytest-sandbox"], capture_output=True)
        before = set(listed.stdout.decode().split())
        loaded = subprocess.run(["docker", "load", "-i", str(archive)], capture_output=True, text=True)
        assert f"Loaded image: {tag}" in loaded.stdout, loaded.stderr
        run = subprocess.run(["docker", "run", "--rm", tag, "cat", "/srv/two"], capture_output=True, text=True)
        assert run.stdout == "two\n", run.stderr
        for key in keys:
            if key not in before:  # the docker backend's own images of these keys stay
                subprocess.run(["docker", "rmi", "-f", f"pytest-sandbox:{key}"], capture_output=True)


def test_skopeo_and_docker_run_the_pushed_image(pushed: tuple[str, Snapshot]) -> None:
    repo, snap = pushed
    if shutil.which("skopeo") is None:
        needs_tool("skopeo", "apt-get install skopeo")
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{repo}:{snap.key}"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["Labels"]["pytest-sandbox.description"] == snap.description
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{repo}:{snap.key}"],
        capture_output=True,
        text=True,
        check=True,
    )
    notes = json.loads(raw.stdout)["annotations"]
    assert notes["org.pytest-sandbox.key"] == snap.key and notes["org.pytest-sandbox.parent"] == snap.parent
    assert notes["org.pytest-sandbox.step"] == "WORKDIR /srv"
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine to run the image (apt-get install docker.io, and access to its socket)")
    run = subprocess.run(
        ["docker", "run", "--rm", f"{repo}:{snap.key}", "sh", "-c", "cat /srv/two; stat -c '%a %u' /srv/app/f; pwd"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "two\n2750 1000\n/srv\n"
    subprocess.run(["docker", "rmi", "-f", f"{repo}:{snap.key}"], capture_output=True)


def test_docker_backend_finds_a_pushed_key(docker_backend, pushed: tuple[str, Snapshot]) -> None:  # type: ignore[no-untyped-def]
    repo, snap = pushed
    lines: list[str] = []
    got = docker_backend.build(IMAGE, cache_from=repo, on_log=lines.append)
    try:
        assert got.key == snap.key and not [x for x in lines if x.startswith("[")], lines
        with docker_backend.create(got) as sb:
            assert sb.exec("cat /srv/two; echo $SHARED; pwd").stdout == "two\nyes\n/srv\n"
    finally:
        docker_backend.remove_snapshot(got)


def test_daytona_backend_makes_its_snapshot_from_the_pushed_image(
    daytona_backend, pushed: tuple[str, Snapshot]
) -> None:  # type: ignore[no-untyped-def]
    repo, snap = pushed
    lines: list[str] = []
    got = daytona_backend.build(IMAGE, cache_from=repo, on_log=lines.append)
    try:
        assert got.key == snap.key and not [x for x in lines if x.startswith("[")], lines
        with daytona_backend.create(got) as sb:
            assert sb.exec("cat /srv/two; echo $SHARED; pwd").stdout == "two\nyes\n/srv\n"
    finally:
        daytona_backend.remove_snapshot(got)


# -- what goes wrong --------------------------------------------------------------------------
def test_a_registry_that_refuses_pushes_is_a_clear_error(
    backend: LocalBackend, pushed: tuple[str, Snapshot], tmp_path: Path
) -> None:
    _, snap = pushed
    proc, addr = start_registry(tmp_path / "ro", storage="  maintenance:\n    readonly:\n      enabled: true\n")
    try:
        with pytest.raises(RegistryError, match=r"refused the push .*not read-only"):
            backend.push(snap, f"{addr}/team/env")
    finally:
        proc.kill()
        proc.wait()


def test_missing_tag_moved_tag_and_host_base(
    backend: LocalBackend, pushed: tuple[str, Snapshot], machine_b: LocalBackend, host: Snapshot
) -> None:
    repo, snap = pushed
    with pytest.raises(RegistryError, match="has no tag"):
        machine_b.pull(f"{repo}:{'0' * 64}")
    # A tag copied by hand onto another key's image: refused, not filed under the wrong key.
    ref = Reference.parse(repo)
    client = RegistryClient()
    _, _, raw = client.manifest(ref, snap.key)
    client.put_manifest(ref, "f" * 64, raw, json.loads(raw)["mediaType"])
    with pytest.raises(RegistryError, match=r"not f{12} as its tag says"):
        machine_b.pull(f"{repo}:{'f' * 64}")
    assert leftovers(machine_b) == []
    with pytest.raises(ConfigError, match=r"Image.host\(\).*cannot run anywhere else"):
        backend.push(host, repo)
    with pytest.raises(ConfigError, match="give the repository only"):
        backend.push(snap, f"{repo}:v1")


def _blob_file(root: Path, digest: str) -> Path:
    return root / "data/docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"


def test_corrupt_blob_is_refused_and_nothing_is_kept(
    backend: LocalBackend, debian: Snapshot, machine_b: LocalBackend, tmp_path: Path
) -> None:
    proc, addr = start_registry(tmp_path / "reg")
    try:
        snap = backend.build(IMAGE)
        backend.push(snap, f"{addr}/c/env")
        machine_b.pull(f"{addr}/c/env:{debian.key}")  # B has the base: the fallback builds only the steps
        _, manifest = RegistryClient().resolve(Reference.parse(f"{addr}/c/env:{snap.key}"))
        top = manifest["layers"][-1]["digest"]
        blob = _blob_file(tmp_path / "reg", top)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        with pytest.raises(RegistryError, match="does not match its digest"):
            machine_b.pull(f"{addr}/c/env:{snap.key}")
        assert machine_b.store.get(snap.key) is None
        assert list((machine_b.store.root / "t").iterdir()) == []
        # cache-from falls back to building (said once), and the build is right.
        lines: list[str] = []
        built = machine_b.build(IMAGE, cache_from=f"{addr}/c/env", on_log=lines.append)
        assert built.key == snap.key
        said = [x for x in lines if x.startswith("cache-from")]
        assert len(said) == 1 and "does not match its digest" in said[0] and "building it instead" in said[0]
        assert next(x for x in lines if x.startswith("[")).startswith("[1/4] RUN"), lines
    finally:
        proc.kill()
        proc.wait()


class _BreakingProxy:
    """Forwards to a registry; big blobs are cut off halfway: closed (``stall=False``) or left
    hanging (``stall=True``)."""

    def __init__(self, upstream: str, stall: bool) -> None:
        outer = self
        self.started = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                req = urllib.request.Request(f"http://{upstream}{self.path}", method=method)
                for h in ("Accept", "Authorization"):
                    if self.headers.get(h):
                        req.add_header(h, self.headers[h])
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                except urllib.error.HTTPError as err:
                    resp = err
                body = resp.read() if method == "GET" else b""
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.end_headers()
                if "/blobs/" in self.path and len(body) > 1 << 20:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    outer.started.set()
                    if stall:
                        time.sleep(600)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_HEAD(self) -> None:
                self._forward("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"


def test_a_download_cut_off_midway_is_an_error_and_leaves_nothing(
    pushed: tuple[str, Snapshot], machine_b: LocalBackend
) -> None:
    repo, snap = pushed
    proxy = _BreakingProxy(repo.split("/", 1)[0], stall=False)
    path = repo.split("/", 1)[1]
    with pytest.raises(RegistryError, match=r"broke off|does not match its digest"):
        machine_b.pull(f"{proxy.address}/{path}:{snap.key}")
    assert leftovers(machine_b) == []
    proxy.server.shutdown()


def test_a_pull_killed_midway_leaves_nothing_after_gc(pushed: tuple[str, Snapshot], tmp_path: Path) -> None:
    repo, snap = pushed
    proxy = _BreakingProxy(repo.split("/", 1)[0], stall=True)
    cache = tmp_path / "b"
    code = (
        "from pytest_sandbox.backends.local import LocalBackend\n"
        f"with LocalBackend({str(cache)!r}) as b:\n"
        f"    b.pull({proxy.address + '/' + repo.split('/', 1)[1] + ':' + snap.key!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert proxy.started.wait(120)  # half the layer is on its way, the rest never comes
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with LocalBackend(cache) as b:
        b.gc()
        assert leftovers(b) == []
        assert b.pull(f"{repo}:{snap.key}").key == snap.key  # and the next pull works
    proxy.server.shutdown()


def test_an_unreachable_cache_falls_back_to_building_said_once(backend: LocalBackend, debian: Snapshot) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}/team/env"
    lines: list[str] = []
    token = os.urandom(6).hex()
    for i in range(2):
        backend.build(DEBIAN.run(f"echo {token}{i} > /unreachable"), cache_from=dead, on_log=lines.append)
    said = [x for x in lines if x.startswith("cache-from")]
    assert len(said) == 1 and "cannot be used" in said[0] and "building instead" in said[0], lines


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [("workdir", "../../etc", "e" * 64), ("env", [["LD_PRELOAD", "/x.so"], ["NOT A NAME", "1"]], "d" * 64)],
)
def test_manifest_annotations_are_checked(
    pushed: tuple[str, Snapshot], machine_b: LocalBackend, field: str, value: object, key: str
) -> None:
    """A registry that serves a record with a relative workdir, or an environment no shell could
    set, is refused."""
    repo, snap = pushed
    ref = Reference.parse(repo)
    client = RegistryClient()
    _, _, raw = client.manifest(ref, snap.key)
    doc = json.loads(raw)
    record = json.loads(doc["annotations"]["org.pytest-sandbox.snapshot"])
    record[field] = value
    doc["annotations"]["org.pytest-sandbox.snapshot"] = json.dumps(record)
    doc["annotations"]["org.pytest-sandbox.key"] = key
    client.put_manifest(ref, key, json.dumps(doc).encode(), doc["mediaType"])
    with pytest.raises(ConfigError, match=f"{field} annotation is malformed"):
        machine_b.pull(f"{repo}:{key}")
    assert leftovers(machine_b) == []


def test_cli_push_pull_export_import(backend: LocalBackend, pushed: tuple[str, Snapshot], tmp_path: Path) -> None:
    repo, snap = pushed
    cli = [sys.executable, "-m", "pytest_sandbox.cli"]

    def run(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, "--cache-dir", str(cache), *args], capture_output=True, text=True, timeout=300)

    pulled = run(tmp_path / "c1", "pull", f"{repo}:{snap.key}")
    assert pulled.returncode == 0 and pulled.stdout.splitlines()[-1] == snap.key, pulled.stderr
    exported = run(tmp_path / "c1", "export", snap.short, "-o", str(tmp_path / "e.tar"))
    assert exported.returncode == 0, exported.stderr
    imported = run(tmp_path / "c2", "import", str(tmp_path / "e.tar"))
    assert imported.returncode == 0 and snap.key in imported.stdout.splitlines(), imported.stderr
    pushed_again = run(tmp_path / "c2", "push", snap.short, repo)
    assert pushed_again.returncode == 0 and "0 layers sent" in pushed_again.stdout, pushed_again.stdout
    missing = run(tmp_path / "c2", "pull", f"{repo}:{'0' * 64}")
    assert missing.returncode != 0 and "has no tag" in missing.stderr


def test_plugin_cache_to_then_cache_from_on_another_machine(
    pytester: pytest.Pytester, cache_dir: Path, debian: Snapshot, registry: str, tmp_path: Path
) -> None:
    """Machine A runs the suite with --sandbox-cache-to; machine B (two xdist workers, an empty
    cache) runs it with --sandbox-cache-from and builds nothing: one worker pulls, once."""
    token = os.urandom(6).hex()
    pytester.makeconftest(
        f"""
        import pytest
        from pytest_sandbox import Image

        @pytest.fixture(scope="session")
        def sandbox_image():
            return Image.debian("bookworm", include=["python3", "python3-pip"]).run("echo {token} > /srv/x")
        """
    )
    pytester.makepyfile(
        test_a=f"""
        def test_one(sandbox):
            assert sandbox.fs.read_text("/srv/x") == "{token}\\n"

        def test_two(sandbox):
            assert sandbox.exec("cat /srv/x").stdout == "{token}\\n"
        """
    )
    repo = f"{registry}/plugin/env"
    a = pytester.runpytest_subprocess(
        f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", f"--sandbox-cache-to={repo}"
    )
    a.assert_outcomes(passed=2)
    assert "1 snapshots built" in a.stdout.str() and "pushed " in a.stdout.str(), a.stdout.str()
    b = pytester.runpytest_subprocess(
        f"--sandbox-cache-dir={tmp_path / 'b'}", "-p", "no:cacheprovider", "-n", "2", f"--sandbox-cache-from={repo}"
    )
    b.assert_outcomes(passed=2)
    out = b.stdout.str() + b.stderr.str()
    assert "sandbox: 0 snapshots built, 1 pulled" in out, out
    assert out.count("sandbox: pulled ") == 1, out
    assert "building" not in out, out


def test_docker_backend_pushes_and_pulls_by_key(  # type: ignore[no-untyped-def]
    docker_backend, docker_debian, daytona_backend, registry: str, tmp_path: Path
) -> None:
    """The docker backend's own push (its committed images, tagged by key), found again by key
    after the local copy is gone, and by the daytona backend; the local engine refuses such an
    image, saying why."""
    repo = f"{registry}/dock/env"
    image = DEBIAN.run(f"echo {os.urandom(4).hex()} > /srv/d")
    snap = docker_backend.build(image)
    try:
        assert docker_backend.push(snap, repo) == f"{repo}:{snap.key}"
        docker_backend.remove_snapshot(snap)
        lines: list[str] = []
        got = docker_backend.build(image, cache_from=repo, on_log=lines.append)
        assert got.key == snap.key and not [x for x in lines if x.startswith("[")], lines
        with LocalBackend(tmp_path / "c") as b, pytest.raises(RegistryError, match="not a pytest-sandbox snapshot"):
            b.pull(f"{repo}:{snap.key}")
        remote = daytona_backend.build(image, cache_from=repo, on_log=lines.append)
        try:
            with daytona_backend.create(remote) as sb:
                assert sb.fs.exists("/srv/d")
        finally:
            daytona_backend.remove_snapshot(remote)
        assert not [x for x in lines if x.startswith("[")], lines
    finally:
        docker_backend.remove_snapshot(snap.key)


def test_push_and_pull_with_credentials(
    backend: LocalBackend, pushed: tuple[str, Snapshot], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry behind htpasswd: no credentials and wrong ones are errors naming `docker login`;
    the docker config's credentials push and pull (the registry client registry bases use)."""
    crypt = pytest.importorskip("crypt", reason="htpasswd needs bcrypt from the crypt module")
    (tmp_path / "htpasswd").write_text(f"psb:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
    proc, reg = start_registry(tmp_path / "registry", auth)
    _, snap = pushed
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_AUTH_CONFIG", raising=False)

    def login(secret: str | None) -> None:
        auths = {} if secret is None else {reg: {"auth": base64.b64encode(f"psb:{secret}".encode()).decode()}}
        config.write_text(json.dumps({"auths": auths}))
        backend._bases._registry_client = None  # read the configuration again

    try:
        login(None)
        with pytest.raises(RegistryError, match=r"requires credentials.*docker login"):
            backend.push(snap, f"{reg}/team/env")
        login("wrong")
        with pytest.raises(RegistryError, match="refused the stored credentials"):
            backend.push(snap, f"{reg}/team/env")
        login("s3cret")
        backend.push(snap, f"{reg}/team/env")
        with LocalBackend(tmp_path / "b") as b:
            assert b.pull(f"{reg}/team/env:{snap.key}").key == snap.key
    finally:
        backend._bases._registry_client = None
        proc.kill()
        proc.wait()


def test_plugin_says_an_unusable_cache_once_per_run(pytester: pytest.Pytester, cache_dir: Path) -> None:
    """Two workers building four recipes, one unreachable registry: the run's output says it once,
    and the tests pass on what was built instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}/team/env"
    token = os.urandom(6).hex()
    pytester.makeconftest(
        f"""
        import pytest
        from pytest_sandbox import Image

        @pytest.fixture(scope="session")
        def sandbox_images():
            return {{n: Image.host().run(f"mkdir -p /work && echo {token}{{n}} > /work/x") for n in "abcd"}}
        """
    )
    pytester.makepyfile(
        test_a="""
        import pytest

        @pytest.mark.parametrize("name", "abcd")
        def test_it(sandbox_factory, name):
            assert sandbox_factory(name).exec("cat /work/x").ok
        """
    )
    result = pytester.runpytest_subprocess(
        f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", "-n", "2", f"--sandbox-cache-from={dead}"
    )
    result.assert_outcomes(passed=4)
    out = result.stdout.str() + result.stderr.str()
    assert out.count(f"cache-from {dead} cannot be used") == 1, out


def test_pull_pinned_by_digest_takes_the_key_from_the_image(
    backend: LocalBackend, pushed: tuple[str, Snapshot], machine_b: LocalBackend
) -> None:
    """`push` says the digest to pin; a pull by digest checks every byte against it and files
    the snapshot under the key the image carries."""
    repo, snap = pushed
    lines: list[str] = []
    backend.push(snap, repo, on_log=lines.append)
    pinned = lines[-1].rsplit(" pin it as ", 1)[1]
    assert pinned.startswith(f"{repo}@sha256:")
    assert machine_b.pull(pinned).key == snap.key
    with pytest.raises(RegistryError, match="has no digest"):
        machine_b.pull(f"{repo}@sha256:{'0' * 64}")
