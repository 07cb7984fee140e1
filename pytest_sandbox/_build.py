"""What every builder shares, whatever it builds on: the build loop (one snapshot per prefix of a
recipe's steps, each under its key's lock), the shell form of steps, the environment build steps
get (host proxies and CA bundle), and the mmdebstrap call that makes a Debian rootfs tarball.

Core module: no backend, no pytest.
"""

from __future__ import annotations

import os
import shlex
import shutil
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from . import _proc, _services
from .errors import (
    ConfigError,
    EngineUnavailableError,
    ExecTimeoutError,
    SandboxError,
    ServiceError,
    SnapshotBuildError,
)
from .image import DebianBase, Image, Step
from .types import LogCallback, Snapshot

__all__ = [
    "BUILD_CA_PATH",
    "build_env",
    "build_recipe",
    "host_ca_bundle",
    "loopback_proxies",
    "mmdebstrap_tar",
    "run_step",
    "step_argv",
]

# Build steps use the host's network, so they also use its trust roots and proxy settings (a
# TLS-intercepting proxy is common in companies). The CA bundle is bound into bwrap's private /dev
# tmpfs so that nothing of it lands in the snapshot.
BUILD_CA_PATH = "/dev/.host-ca-certificates.crt"
_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def host_ca_bundle() -> str | None:
    import ssl

    for cand in (
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ):
        if cand and os.path.isfile(cand):
            return cand
    return None


def build_env(ca_path: str = BUILD_CA_PATH) -> dict[str, str]:
    """Environment for build steps: host proxies, and the host CA bundle found at ``ca_path``."""
    env = {k: v for k, v in os.environ.items() if k in _PROXY_VARS}
    if host_ca_bundle():
        for var in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            env[var] = ca_path
    return env


def loopback_proxies(env: dict[str, str]) -> tuple[dict[str, str], dict[int, tuple[str, int]]]:
    """Proxies on the host's loopback (a local proxy such as cntlm), which a network of the
    sandbox's own cannot reach: ``env`` with each such variable pointing at ``127.0.0.1`` inside
    the sandbox instead, and for each port there, the host address it stands for. A build step
    reaches that one port through a forwarder, never by joining the host's network."""
    out, ports = dict(env), dict[int, tuple[str, int]]()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        value = env.get(name, "")
        if not value:
            continue
        url = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
        host = url.hostname or ""
        if host != "localhost" and not host.startswith("127.") and host != "::1":
            continue
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            continue  # not a port: the proxy variable is broken whatever we do
        ports.setdefault(port, ("::1" if host == "::1" else "127.0.0.1", port))
        user = url.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
        out[name] = urllib.parse.urlunsplit(url._replace(netloc=netloc))
    return out, ports


def step_argv(step: Step) -> list[str]:
    if step.kind == "run":
        return ["/bin/sh", "-c", step.args[0]] if len(step.args) == 1 else list(step.args)
    if step.kind == "apt":
        pkgs = " ".join(shlex.quote(p) for p in step.args)
        # APT::Sandbox::User=root: rootless sandboxes map a single uid, so apt cannot drop to _apt.
        return [
            "/bin/sh",
            "-c",
            "export DEBIAN_FRONTEND=noninteractive; "
            "apt-get -o APT::Sandbox::User=root update -q && "
            f"apt-get -o APT::Sandbox::User=root install -y -q --no-install-recommends {pkgs} && "
            "apt-get clean && rm -rf /var/lib/apt/lists/*",
        ]
    if step.kind == "pip":
        return [
            "/bin/sh",
            "-c",
            "PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 "
            "python3 -m pip install --no-cache-dir " + " ".join(shlex.quote(p) for p in step.args),
        ]
    raise AssertionError(step.kind)


def mmdebstrap_tar(base: DebianBase, key: str, out: Path, nsteps: int, log: LogCallback) -> None:
    """Build the Debian rootfs of an ``Image.debian`` base into the tarball ``out``."""
    mm = shutil.which("mmdebstrap")
    if mm is None:
        raise EngineUnavailableError(
            "Image.debian() needs mmdebstrap, which is not installed: run `sudo apt-get install "
            "mmdebstrap` (Debian/Ubuntu), or use Image.from_rootfs(...) with a rootfs tarball."
        )
    argv = [mm, f"--variant={base.variant}", "--format=tar"]
    if base.include:
        argv.append("--include=" + ",".join(base.include))
    # Every option before "--": the suite and the path are positional whatever they hold.
    argv += ["--", base.suite, str(out)]
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(line)
        log(line)

    res = _proc.run(argv, on_line=keep, env={**os.environ, "LC_ALL": "C.UTF-8"}, die_with_parent=True)
    if res.returncode != 0:
        raise SnapshotBuildError(
            key=key,
            step_index=0,
            step_count=nsteps,
            step=f"FROM debian:{base.suite}",
            exit_code=res.returncode,
            output="\n".join(lines),
        )


def build_recipe(
    image: Image,
    *,
    get: Callable[[str], Snapshot | None],
    lock: Callable[[str], AbstractContextManager[object]],
    build_base: Callable[[Image, str, LogCallback], Snapshot],
    build_step: Callable[[Snapshot, Step, str, int, int, LogCallback], Snapshot],
    on_log: LogCallback | None,
    rebuild: bool | float,
    fetch: Callable[[str], Snapshot | None] | None = None,
) -> Snapshot:
    """The build loop every backend shares: one snapshot per prefix of the steps, each built under
    its key's lock by the first process to get there and reused by the others.

    ``rebuild=True`` ignores cached step snapshots; a timestamp ignores those created before it
    (so parallel workers of one run still build once). The base is always reused when present.
    ``fetch`` (a shared cache: ``--sandbox-cache-from``) is asked for the deepest key missing
    here, deepest first, before anything is built; only the steps after what it gives are built.
    """
    if not isinstance(image, Image):
        raise ConfigError(f"build() takes an Image, got {type(image).__name__}")
    log = on_log or (lambda _line: None)
    keys = image.prefix_keys()
    n = len(image.steps)

    def cached(key: str) -> Snapshot | None:
        snap = get(key)
        if snap is None or rebuild is True:
            return None
        if rebuild is not False and snap.created < float(rebuild):
            return None
        return snap

    hit = cached(keys[-1])
    if hit is not None:
        return hit
    start, current = 0, None
    if fetch is not None and rebuild is False:
        for i in range(n, -1, -1):
            if get(keys[i]) is not None:
                break  # this machine has that far: build the rest from it
            got = fetch(keys[i])
            if got is not None:
                if i == n:
                    return got
                start, current = i, got
                break
    if current is None:
        with lock(keys[0]):
            current = get(keys[0]) or build_base(image, keys[0], log)
    for i, step in enumerate(image.steps[start:], start=start + 1):
        with lock(keys[i]):
            hit = cached(keys[i])
            if hit is not None:
                current = hit
                continue
            log(f"[{i}/{n}] {step.describe()}")
            current = build_step(current, step, keys[i], i, n, log)
    return current


def run_step(
    sb: Any, step: Step, *, key: str, index: int, count: int, workdir: str, env: dict[str, str], log: LogCallback
) -> str:
    """Run one file-changing step (copy, workdir, run, apt, pip) in a build sandbox of any backend.

    Returns the working directory after the step; a failure becomes a :class:`SnapshotBuildError`
    carrying the step, its exit code and its output.
    """
    output: list[str] = []

    def keep(line: str) -> None:
        output.append(line)
        log("    " + line)

    def fail(code: int | None, reason: str = "") -> SnapshotBuildError:
        return SnapshotBuildError(
            key=key,
            step_index=index,
            step_count=count,
            step=step.describe(),
            exit_code=code,
            output="\n".join(output),
            reason=reason,
        )

    if step.kind == "copy":
        assert step.source is not None
        try:
            sb.fs.upload(step.source, step.args[0])
            if step.mode is not None:
                sb.exec(["chmod", f"{step.mode:o}", step.args[0]]).check()
        except (OSError, SandboxError) as exc:
            raise fail(None, f"copy failed: {exc}") from exc
        return workdir
    if step.kind == "workdir":
        sb.fs.mkdir(step.args[0])
        return str(step.args[0])
    if step.kind == "service":  # started and ready now: later steps run with it up
        svc = step.service()
        try:
            _services.start(sb, svc, key[:12])
        except ServiceError as exc:
            output.append(exc.log)
            raise fail(None, exc.reason) from exc
        sb.running_services.append(svc)
        if svc.warm:  # a live service warmed up before it is frozen running
            try:
                res = sb._run(["/bin/sh", "-c", svc.warm], cwd=workdir, env=env, on_line=keep)
            except ExecTimeoutError as exc:
                raise fail(None, f"service {svc.name}'s warm command timed out") from exc
            if res.exit_code != 0:
                raise fail(res.exit_code, f"service {svc.name}'s warm command failed")
        return workdir
    try:
        res = sb._run(step_argv(step), cwd=workdir, env={**env, **dict(step.env)}, on_line=keep)
    except ExecTimeoutError as exc:
        raise fail(None, "timed out") from exc
    if res.exit_code != 0:
        raise fail(res.exit_code)
    return workdir
