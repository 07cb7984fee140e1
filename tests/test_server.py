"""The Daytona-compatible endpoint (pytest_sandbox.server) under load and under bad input, over HTTP.

The endpoint runs as `pytest-sandbox serve --daytona` in a subprocess, as users run it; the
lifecycle cases (timeouts, shutdown from another thread) drive a DaytonaServer in this process.
tests/test_daytona.py covers what the SDK does through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("daytona_api_client", reason="pip install 'pytest-sandbox[daytona]'")
aiohttp = pytest.importorskip("aiohttp")

from pytest_sandbox import Backend, SandboxError, Snapshot  # noqa: E402
from pytest_sandbox.backends.local import LocalBackend  # noqa: E402
from pytest_sandbox.server import DaytonaServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", autouse=True)
def _enough_fds() -> None:
    # 400 concurrent clients plus 150 idle connections, in this one process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))


def _serve(cache_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`pytest-sandbox serve --daytona` on a free port: the process and its DAYTONA_API_URL."""
    argv = [sys.executable, "-m", "pytest_sandbox.cli", "--cache-dir", str(cache_dir), "serve", "--daytona"]
    argv += ["--api-key", KEY, "--port", "0", "--until-stdin-closes", *extra]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("DAYTONA_API_URL="), line
    return proc, line.split("=", 1)[1]


@pytest.fixture(scope="module")
def endpoint(cache_dir: Path) -> Iterator[str]:
    """An endpoint with a 1 MiB body limit: its DAYTONA_API_URL."""
    proc, url = _serve(cache_dir, "--max-body", "1M")
    yield url
    assert proc.stdin is not None
    proc.stdin.close()  # the lifeline: it deletes its sandboxes and exits
    assert proc.wait(timeout=60) == 0


def _request(url: str, method: str = "GET", body: Any = None, **headers: str) -> tuple[int, Any]:
    """One request on a connection of its own: the status and the decoded JSON answer (or None)."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=60)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers={**AUTH, **headers})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def sandbox(endpoint: str) -> Iterator[str]:
    """One sandbox of the default (host) image, created through the REST API: its id."""
    status, box = _request(f"{endpoint}/sandbox", "POST", {"labels": {"test": "server"}})
    assert status == 200 and box["state"] == "started", box
    yield box["id"]
    assert _request(f"{endpoint}/sandbox/{box['id']}", "DELETE")[0] == 200


# -- load ------------------------------------------------------------------------------------
def test_400_concurrent_clients_are_all_served(endpoint: str, sandbox: str) -> None:
    base = endpoint.removesuffix("/api")

    async def run() -> list[tuple[str, int, Any]]:
        # limit=0 and force_close: every request opens a connection of its own, all at once.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, headers=AUTH) as session:

            async def call(kind: str, method: str, url: str, body: Any = None) -> tuple[str, int, Any]:
                async with session.request(method, url, json=body) as resp:
                    return kind, resp.status, await resp.json()

            execs = [
                call("exec", "POST", f"{base}/toolbox/{sandbox}/process/execute", {"command": "echo hi"})
                for _ in range(200)
            ]
            gets = [call("get", "GET", f"{endpoint}/sandbox/{sandbox}") for _ in range(200)]
            return await asyncio.gather(*execs, *gets)

    results = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert len(results) == 400
    for kind, status, body in results:
        assert status == 200, (kind, body)
        if kind == "exec":
            assert body == {"exitCode": 0, "result": "hi\n"}
        else:
            assert (body["id"], body["state"]) == (sandbox, "started")


def test_idle_connections_do_not_keep_others_waiting(endpoint: str, sandbox: str) -> None:
    u = urllib.parse.urlsplit(endpoint)
    idle = []
    try:
        for i in range(150):
            s = socket.create_connection((u.hostname, u.port), timeout=10)
            if i % 2:  # half of them stall midway through a request
                s.sendall(b"GET /api/sandbox HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        start = time.monotonic()
        status, body = _request(f"{endpoint}/sandbox/{sandbox}")
        assert status == 200 and body["id"] == sandbox
        assert time.monotonic() - start < 10
    finally:
        for s in idle:
            s.close()


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("process/execute", {"command": 5}, "command in the request body must be a string, not a number"),
        ("process/execute", {"command": "true", "timeout": "3"}, "timeout in the request body must be an integer"),
        ("process/execute", {"command": "true", "timeout": -1}, "timeout must be at least 0"),
        ("process/execute", {"command": "true", "envs": {"A": 1}}, "envs.A in the request body must be a string"),
        ("process/execute", {}, "command is missing"),
        ("process/execute", [1], "must be a JSON object, not an array"),
        ("process/execute", "not json {", "request body is not JSON"),
        ("process/execute", b"\xff\xfe\xfa", "request body is not JSON"),
        ("files/bulk-download", {"paths": "/etc/hostname"}, "paths in the request body must be an array of strings"),
        ("files/bulk-upload", b"plain", "expected a multipart/form-data body"),
    ],
)
def test_malformed_toolbox_input_is_a_400_with_a_message(
    endpoint: str, sandbox: str, path: str, body: Any, words: str
) -> None:
    url = f"{endpoint.removesuffix('/api')}/toolbox/{sandbox}/{path}"
    status, answer = _request(url, "POST", body, **{"Content-Type": "application/json"})
    assert status == 400, answer
    assert words in answer["message"], answer
    assert answer["statusCode"] == 400 and answer["method"] == "POST"


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        ("POST", "/sandbox", {"labels": {"a": 1}}, "labels.a in the request body must be a string"),
        ("POST", "/sandbox", {"autoStopInterval": True}, "autoStopInterval in the request body must be an integer"),
        ("POST", "/sandbox", {"networkBlockAll": "yes"}, "networkBlockAll in the request body must be a boolean"),
        ("POST", "/sandbox", {"buildInfo": "FROM x"}, "buildInfo of the request body must be a JSON object"),
        ("POST", "/sandbox", {"buildInfo": {"dockerfileContent": "COPY a b"}}, "must start with FROM"),
        ("POST", "/snapshots", {"imageName": "debian:bookworm"}, "name is missing"),
        ("POST", "/snapshots", {"name": ["x"]}, "name in the request body must be a string, not an array"),
        ("PUT", "/sandbox/{sid}/labels", {"labels": ["a"]}, "labels in the request body must be an object"),
        ("POST", "/sandbox/{sid}/snapshot", {"name": None}, "name is missing"),
        ("GET", "/snapshots?page=x", None, "query parameter page must be an integer"),
        ("GET", "/snapshots?limit=0", None, "query parameter limit must be at least 1"),
        ("GET", "/sandbox?labels=%5B1%5D", None, "labels in the query must be an object of strings"),
        ("GET", "/sandbox?labels=%7B", None, "the labels query parameter is not JSON"),
    ],
)
def test_malformed_api_input_is_a_400_with_a_message(
    endpoint: str, sandbox: str, method: str, path: str, body: Any, words: str
) -> None:
    before = _request(f"{endpoint}/sandbox")[1]["items"]
    status, answer = _request(endpoint + path.format(sid=sandbox), method, body)
    assert status == 400, answer
    assert words in answer["message"], answer
    assert _request(f"{endpoint}/sandbox")[1]["items"] == before  # nothing was created


def test_bad_query_parameters_of_the_toolbox(endpoint: str, sandbox: str) -> None:
    tb = f"{endpoint.removesuffix('/api')}/toolbox/{sandbox}"
    status, answer = _request(f"{tb}/files/folder?path=/made&mode=9z", "POST")
    assert status == 400 and "mode must be octal permissions" in answer["message"], answer
    status, answer = _request(f"{tb}/files/folder?path=/made&mode=77777", "POST")
    assert status == 400, answer
    status, answer = _request(f"{tb}/files/info?path=/no/such/file")
    assert (status, answer["code"]) == (404, "FILE_NOT_FOUND"), answer
    status, answer = _request(f"{tb}/files/info?path=/a%00b")
    assert status == 400, answer


def test_unknown_ids_and_routes_are_404(endpoint: str) -> None:
    base = endpoint.removesuffix("/api")
    for method, url in [
        ("GET", f"{endpoint}/sandbox/no-such-sandbox"),
        ("DELETE", f"{endpoint}/sandbox/no-such-sandbox"),
        ("POST", f"{endpoint}/sandbox/no-such-sandbox/stop"),
        ("GET", f"{endpoint}/snapshots/no-such-snapshot"),
        ("POST", f"{base}/toolbox/no-such-sandbox/process/execute"),
        ("GET", f"{base}/toolbox/no-such-sandbox/files?path=/"),
    ]:
        body = {"command": "true"} if url.endswith("execute") else None
        status, answer = _request(url, method, body)
        assert status == 404 and "not found" in answer["message"], (url, answer)
    for method, path in [("GET", "/api/nothing-here"), ("PATCH", "/api/sandbox"), ("GET", "/toolbox/x/pty")]:
        status, answer = _request(base + path, method)
        assert status == 404, answer
        assert answer["message"] == f"Cannot {method} {path} (not covered by the local Daytona endpoint)"
    status, answer = _request(f"{endpoint}/sandbox", "POST", {"snapshot": "no-such-snapshot"})
    assert status == 404 and "Snapshot no-such-snapshot not found" in answer["message"], answer


def test_a_missing_or_wrong_key_is_401(endpoint: str, sandbox: str) -> None:
    for auth in ("", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"):
        for url in (f"{endpoint}/sandbox/{sandbox}", f"{endpoint}/nothing-here"):
            status, answer = _request(url, Authorization=auth)
            assert status == 401 and "DAYTONA_API_KEY" in answer["message"], (auth, answer)


def test_a_body_over_the_limit_is_413(endpoint: str, sandbox: str) -> None:
    url = f"{endpoint.removesuffix('/api')}/toolbox/{sandbox}/process/execute"
    big = json.dumps({"command": "true", "pad": "x" * (2 << 20)}).encode()
    status, answer = _request(url, "POST", big)
    assert status == 413 and "limit of 1048576 bytes" in answer["message"], answer

    def chunks() -> Iterator[bytes]:  # no Content-Length to judge it by
        for _ in range(32):
            yield b" " * (64 << 10)

    status, answer = _request(url, "POST", chunks())  # http.client sends an iterable chunked
    assert status == 413, answer
    upload = f"{endpoint.removesuffix('/api')}/toolbox/{sandbox}/files/bulk-upload"
    form = (
        b'--b\r\nContent-Disposition: form-data; name="files[0].path"\r\n\r\n/big\r\n'
        b'--b\r\nContent-Disposition: form-data; name="files[0].file"; filename="big"\r\n\r\n'
        + b"x" * (2 << 20)
        + b"\r\n--b--\r\n"
    )
    ctype = "multipart/form-data; boundary=b"
    status, answer = _request(upload, "POST", form, **{"Content-Type": ctype})
    assert status == 413, answer
    # Just under the limit is fine, and the endpoint still answers on.
    status, answer = _request(url, "POST", {"command": "echo ok", "pad": "x" * (1 << 19)})
    assert (status, answer) == (200, {"exitCode": 0, "result": "ok\n"})


# -- lifecycle, in this process --------------------------------------------------------------
@pytest.fixture
def server(backend: LocalBackend, tmp_path: Path) -> Iterator[DaytonaServer]:
    """A DaytonaServer with one-second timeouts, serving in a thread of its own."""
    srv = DaytonaServer(backend, tmp_path / "state", api_key=KEY, request_timeout=1.0, keepalive_timeout=1.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive()


def _read_all(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_slow_and_idle_clients_are_cut_off(server: DaytonaServer) -> None:
    addr = (server.host, server.port)
    start = time.monotonic()
    with socket.create_connection(addr, timeout=20) as slow, socket.create_connection(addr, timeout=20) as idle:
        slow.sendall(
            b"POST /api/sandbox HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = _read_all(slow)  # the rest never comes
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive within 1 s" in answer
        assert _read_all(idle) == b""  # closed after a second of nothing
    assert time.monotonic() - start < 15


def test_shutdown_from_another_thread_deletes_every_sandbox(server: DaytonaServer) -> None:
    status, box = _request(f"{server.api_url}/sandbox", "POST", {})
    assert status == 200, box
    rec = server.state.sandbox(box["id"])
    assert rec.sb is not None
    sb = rec.sb
    done = threading.Event()
    threading.Thread(target=lambda: (server.shutdown(), done.set()), daemon=True).start()
    assert done.wait(timeout=30)
    assert rec.state == "destroyed" and rec.sb is None
    assert server.state.sandboxes({}) == []
    with pytest.raises(SandboxError):
        sb.exec("true")
    with pytest.raises(OSError):
        _request(f"{server.api_url}/sandbox")
    server.shutdown()  # idempotent


def test_the_endpoint_serves_the_docker_backend_too(
    docker_backend: Backend, docker_debian: Snapshot, tmp_path: Path
) -> None:
    """The endpoint needs only the protocol: the same calls work over docker's containers."""
    srv = DaytonaServer(docker_backend, tmp_path / "state", api_key=KEY, default_image=docker_debian.key)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, box = _request(f"{srv.api_url}/sandbox", "POST", {})
        assert status == 200 and box["state"] == "started", box
        toolbox = f"{srv.url}/toolbox/{box['id']}"
        status, res = _request(f"{toolbox}/process/execute", "POST", {"command": "mkdir -p /w && echo hi > /w/f"})
        assert (status, res) == (200, {"exitCode": 0, "result": ""})
        status, info = _request(f"{toolbox}/files/info?path=/w/f")
        assert status == 200 and info["size"] == 3 and info["owner"] == "root" and not info["isDir"], info
        status, listing = _request(f"{toolbox}/files?path=/w")
        assert status == 200 and [f["name"] for f in listing] == ["f"], listing
        assert _request(f"{toolbox}/files/info?path=/nope")[0] == 404
        rec = srv.state.sandbox(box["id"])
        container = rec.sb.container  # type: ignore[union-attr]
        assert _request(f"{srv.api_url}/sandbox/{box['id']}", "DELETE")[0] == 200
        with pytest.raises(docker_backend._errors.NotFound):  # type: ignore[attr-defined]
            container.reload()
    finally:
        srv.shutdown()
        thread.join(timeout=30)


# -- what a client names: never an option of a host command, never a host path -------------------
@pytest.mark.parametrize(
    ("image", "words"),
    [
        # Before: the suite went to mmdebstrap's argv, where "--setup-hook=CMD" is an option that ran
        # CMD on the endpoint's host (as root when it runs as root).
        ("debian:--setup-hook=touch\t$PSB_MARK", "is not valid"),
        ("debian:--customize-hook=touch${IFS}$PSB_MARK", "is not valid: a suite is a name"),
        ("debian:bookworm\nx", "may not start with '-' or hold whitespace"),
        ("--setup-hook=touch${IFS}$PSB_MARK", "may not start with '-'"),
        # Before: a host directory became a base, and an API client read a 0600 file of a 0700
        # directory it had no right to.
        ("{secret}", "names something of the endpoint's machine"),
        ("rootfs:{secret}", "names something of the endpoint's machine"),
        ("host", "names something of the endpoint's machine"),
        ("evil.example:99999/x", "is not a registry host"),
    ],
)
@pytest.mark.parametrize("form", ["imageName", "Dockerfile"])
def test_a_clients_image_reference_runs_no_option_and_names_no_host_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path, image: str, words: str, form: str
) -> None:
    mark, secret = tmp_path / "pwned", tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("s3cret")
    monkeypatch.setenv("PSB_MARK", str(mark))
    proc, url = _serve(cache_dir)
    try:
        ref = image.replace("{secret}", str(secret))
        body: dict[str, Any] = {"name": f"attack-{form}"}
        if form == "imageName":
            body["imageName"] = ref
        else:
            if "\n" in ref:  # a newline ends a Dockerfile's line: what follows is another instruction
                words = "is not supported by the local Daytona endpoint"
            body["buildInfo"] = {"dockerfileContent": f"FROM {ref}\nRUN cat /key\n"}
        before = _request(f"{url}/snapshots")[1]["items"]
        status, answer = _request(f"{url}/snapshots", "POST", body)
        assert status == 400, answer
        assert words in answer["message"], answer
        assert _request(f"{url}/snapshots")[1]["items"] == before  # nothing was started or recorded
        time.sleep(0.5)  # a hook would have run by now
        assert not mark.exists()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_clients_network_allow_list_is_parsed_strictly(endpoint: str) -> None:
    for bad in ("10.0.0.0/8 -j ACCEPT", "-A OUTPUT", "10.0.0.0/33"):
        status, answer = _request(f"{endpoint}/sandbox", "POST", {"networkAllowList": bad})
        assert status == 400 and "is not a CIDR" in answer["message"], answer
