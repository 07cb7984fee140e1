"""Image references and registry configuration (credentials, mirrors, plain-HTTP registries).

Standard library only (the core install stays light). :mod:`.client` talks to registries;
the local engine turns what it fetches into layers (``engine/unpack.py``).

Configuration, as Docker and the containers tools read it:

- credentials: ``DOCKER_AUTH_CONFIG`` (a config.json's contents, as CI runners pass them), then
  ``REGISTRY_AUTH_FILE``, ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json`` (``auths``
  entries, and ``credHelpers``/``credsStore`` helpers); anonymous token flow otherwise;
- mirrors: ``PYTEST_SANDBOX_REGISTRY_MIRRORS`` (comma-separated; ``URL`` mirrors Docker Hub,
  ``REGISTRY=URL`` another registry), plus ``registry-mirrors`` in ``/etc/docker/daemon.json``;
- plain HTTP: registries on loopback (127.0.0.0/8, ``localhost``, ``::1``) always, as Docker does;
  others listed in ``PYTEST_SANDBOX_INSECURE_REGISTRIES`` or ``insecure-registries`` of daemon.json.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..refs import DOCKER_HUB, Reference

__all__ = ["ACCEPT", "DOCKER_HUB", "INDEX_TYPES", "MANIFEST_TYPES", "Reference", "RegistryConfig", "host_platform"]

_HUB_API = "registry-1.docker.io"
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)


def host_platform() -> tuple[str, str, str | None]:
    """(os, architecture, variant) of this machine, in OCI's terms."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386", "i386": "386"}
    if machine.startswith("armv7"):
        return "linux", "arm", "v7"
    if machine.startswith("armv6"):
        return "linux", "arm", "v6"
    return "linux", arch.get(machine, machine), ("v8" if machine in ("aarch64", "arm64") else None)


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class RegistryConfig:
    """Where to fetch from and with which credentials; :meth:`from_environment` reads the usual files."""

    mirrors: dict[str, list[str]] = field(default_factory=dict)
    insecure: set[str] = field(default_factory=set)
    auth_files: list[Path] = field(default_factory=list)

    @classmethod
    def from_environment(cls) -> RegistryConfig:
        cfg = cls()
        daemon = Path(os.environ.get("PYTEST_SANDBOX_DOCKER_DAEMON_JSON", "/etc/docker/daemon.json"))
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(daemon.read_text())
            cfg.mirrors.setdefault(DOCKER_HUB, []).extend(data.get("registry-mirrors") or [])
            cfg.insecure.update(data.get("insecure-registries") or [])
        for item in filter(None, (x.strip() for x in os.environ.get("PYTEST_SANDBOX_REGISTRY_MIRRORS", "").split(","))):
            reg, eq, url = item.partition("=")
            if not eq:
                reg, url = DOCKER_HUB, item
            if "://" not in url:
                raise ConfigError(f"PYTEST_SANDBOX_REGISTRY_MIRRORS: {item!r} needs a URL like https://mirror.example")
            cfg.mirrors.setdefault(reg, []).insert(0, url.rstrip("/"))
        cfg.insecure.update(x.strip() for x in os.environ.get("PYTEST_SANDBOX_INSECURE_REGISTRIES", "").split(","))
        cfg.insecure.discard("")
        for env, rel in (("REGISTRY_AUTH_FILE", ""), ("DOCKER_CONFIG", "config.json")):
            if os.environ.get(env):
                cfg.auth_files.append(Path(os.environ[env]) / rel if rel else Path(os.environ[env]))
        cfg.auth_files.append(Path.home() / ".docker" / "config.json")
        return cfg

    def endpoints(self, registry: str) -> list[str]:
        """Base URLs to try for ``registry``: its mirrors first, then the registry itself."""
        host = _HUB_API if registry == DOCKER_HUB else registry
        scheme = "http" if _is_loopback(host) or registry in self.insecure else "https"
        return [*self.mirrors.get(registry, []), f"{scheme}://{host}"]

    def _auth_documents(self) -> Iterator[dict[str, Any]]:
        # DOCKER_AUTH_CONFIG holds a config.json's contents (the convention of CI runners).
        texts = [os.environ.get("DOCKER_AUTH_CONFIG", "")]
        for path in self.auth_files:
            with contextlib.suppress(OSError):
                texts.append(path.read_text())
        for text in texts:
            try:
                doc = json.loads(text) if text else None
            except ValueError:
                continue
            if isinstance(doc, dict):
                yield doc

    def credentials(self, registry: str) -> tuple[str, str] | None:
        """(user, secret) for ``registry`` from the first auth file that has them."""
        keys = {registry, f"https://{registry}", f"http://{registry}"}
        if registry == DOCKER_HUB:
            keys |= {"https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"}
        for data in self._auth_documents():
            for key, entry in (data.get("auths") or {}).items():
                if key.rstrip("/") in keys or key in keys:
                    if entry.get("auth"):
                        user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
                        return user, secret
                    if entry.get("username"):
                        return entry["username"], entry.get("password", "")
            helper = (data.get("credHelpers") or {}).get(registry) or data.get("credsStore")
            if helper:
                found = _cred_helper(helper, "https://index.docker.io/v1/" if registry == DOCKER_HUB else registry)
                if found:
                    return found
        return None


def _cred_helper(helper: str, server: str) -> tuple[str, str] | None:
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        return None
    res = subprocess.run([exe, "get"], input=server, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return None
    data = json.loads(res.stdout)
    return str(data.get("Username", "")), str(data.get("Secret", ""))
