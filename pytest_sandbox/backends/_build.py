"""What every backend's builder shares: the shell form of recipe steps, the environment build
steps get, and the mmdebstrap call that makes a Debian rootfs tarball."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ..api import LogCallback
from ..errors import EngineUnavailableError, SnapshotBuildError
from ..image import Step
from . import _proc

__all__ = ["BUILD_CA_PATH", "build_env", "host_ca_bundle", "mmdebstrap_tar", "step_argv"]

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


def mmdebstrap_tar(base: dict[str, Any], key: str, out: Path, nsteps: int, log: LogCallback) -> None:
    """Build the Debian rootfs of an ``Image.debian`` base into the tarball ``out``."""
    mm = shutil.which("mmdebstrap")
    if mm is None:
        raise EngineUnavailableError(
            "Image.debian() needs mmdebstrap, which is not installed: run `sudo apt-get install "
            "mmdebstrap` (Debian/Ubuntu), or use Image.from_rootfs(...) with a rootfs tarball."
        )
    argv = [mm, f"--variant={base['variant']}", "--format=tar"]
    if base.get("include"):
        argv.append("--include=" + ",".join(base["include"]))
    argv += [base["suite"], str(out)]
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
            step=f"FROM debian:{base['suite']}",
            exit_code=res.returncode,
            output="\n".join(lines),
        )
