"""A small OCI registry client: references, manifests, platform selection, authentication,
mirrors, and digest-verified blob downloads.

Core module: standard library only (the core install stays light), no pytest, no backend. The
local engine turns what it fetches into layers (``backends/_oci.py``).

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
import hashlib
import ipaddress
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, SandboxError

__all__ = [
    "Reference",
    "RegistryClient",
    "RegistryConfig",
    "RegistryError",
    "host_platform",
]

DOCKER_HUB = "docker.io"
_HUB_API = "registry-1.docker.io"
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(SandboxError):
    """A registry refused, lacked or garbled what was asked for; the message says what to do."""


def host_platform() -> tuple[str, str, str | None]:
    """(os, architecture, variant) of this machine, in OCI's terms."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386", "i386": "386"}
    if machine.startswith("armv7"):
        return "linux", "arm", "v7"
    if machine.startswith("armv6"):
        return "linux", "arm", "v6"
    return "linux", arch.get(machine, machine), ("v8" if machine in ("aarch64", "arm64") else None)


@dataclass(frozen=True)
class Reference:
    """An image reference normalised as Docker does (``python:3.12`` is
    ``docker.io/library/python:3.12``)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        """Parse ``[registry/]name[:tag][@sha256:...]``; a missing tag means ``latest``."""
        if not ref or any(c.isspace() for c in ref):
            raise ConfigError(f"image reference {ref!r} is not valid; use e.g. 'python:3.12-slim'")
        rest, _, digest = ref.partition("@")
        if digest and not _DIGEST.match(digest):
            raise ConfigError(f"image reference {ref!r}: the digest must look like sha256:<64 hex digits>")
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, remainder
        else:
            registry, path = DOCKER_HUB, rest
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DOCKER_HUB
        if ":" in path.rsplit("/", 1)[-1]:
            name, _, tag = path.rpartition(":")
        else:
            name, tag = path, ""
        if registry == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"
        if not _NAME.match(name):
            raise ConfigError(
                f"image reference {ref!r}: {name!r} is not a valid repository name (lowercase letters, digits, "
                "separators . _ - and /)"
            )
        if tag and not _TAG.match(tag):
            raise ConfigError(f"image reference {ref!r}: {tag!r} is not a valid tag")
        return cls(registry, name, tag or (None if digest else "latest"), digest or None)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def pinned(self, digest: str) -> Reference:
        """The same image at ``digest``."""
        return Reference(self.registry, self.repository, self.tag, digest)


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # followed by hand, so credentials never travel to the blob store's host


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _registry_errors(body: bytes) -> list[str]:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return [str(e.get("code", "")) for e in json.loads(body).get("errors", [])]
    return []


class RegistryClient:
    """Fetches manifests and blobs from registries (Docker Registry HTTP API V2 / OCI distribution)."""

    def __init__(self, config: RegistryConfig | None = None, ca_file: str | None = None) -> None:
        self.config = config or RegistryConfig.from_environment()
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect())
        self._tokens: dict[tuple[str, str], str] = {}

    # -- HTTP ----------------------------------------------------------------------------------
    def _open(self, ref: Reference, path: str, accept: str | None = None) -> tuple[Any, str]:
        """GET ``/v2/<repository>/<path>`` from the first endpoint that answers; returns the open
        response and the endpoint used. Authentication challenges are answered as they come."""
        failures: list[str] = []
        endpoints = self.config.endpoints(ref.registry)
        for i, base in enumerate(endpoints):
            upstream = i == len(endpoints) - 1
            try:
                return self._get(ref, f"{base}/v2/{ref.repository}/{path}", accept), base
            except RegistryError as exc:
                if upstream:
                    raise
                failures.append(f"mirror {base}: {exc}")
            except OSError as exc:
                if upstream:
                    detail = f" (mirrors: {'; '.join(failures)})" if failures else ""
                    raise RegistryError(
                        f"cannot reach the registry {ref.registry} at {base}: {getattr(exc, 'reason', exc)}{detail}. "
                        "Check the network, or set PYTEST_SANDBOX_REGISTRY_MIRRORS to a mirror you can reach."
                    ) from exc
                failures.append(f"mirror {base}: {getattr(exc, 'reason', exc)}")
        raise AssertionError("unreachable")

    def _get(self, ref: Reference, url: str, accept: str | None) -> Any:
        scope = f"repository:{ref.repository}:pull"
        host = urllib.parse.urlsplit(url).netloc
        for _ in range(6):  # an auth round, then redirects
            req = urllib.request.Request(url)
            if accept:
                req.add_header("Accept", accept)
            token = self._tokens.get((host, scope))
            if token and urllib.parse.urlsplit(url).netloc == host:
                req.add_unredirected_header("Authorization", token)
            try:
                return self._opener.open(req, timeout=60)
            except urllib.error.HTTPError as err:
                body = err.read()
                if err.code in (301, 302, 303, 307, 308) and err.headers.get("Location"):
                    url = urllib.parse.urljoin(url, err.headers["Location"])
                    continue
                if err.code == 401 and not token:
                    self._tokens[(host, scope)] = self._authenticate(
                        ref, err.headers.get("WWW-Authenticate", ""), scope
                    )
                    continue
                raise self._error(ref, err.code, body, url) from err
        raise RegistryError(f"{ref}: too many redirects or authentication rounds at {url}")

    def _authenticate(self, ref: Reference, header: str, scope: str) -> str:
        scheme, params = _challenge(header)
        creds = self.config.credentials(ref.registry)
        if scheme == "basic":
            if creds is None:
                raise self._needs_login(ref)
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"{ref.registry} asks for authentication this client does not speak: {header!r}")
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        req = urllib.request.Request(f"{params['realm']}?{urllib.parse.urlencode(query)}")
        if creds is not None:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode())
        try:
            with self._opener.open(req, timeout=60) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise self._needs_login(ref, refused=creds is not None) from err
            raise RegistryError(f"the token service of {ref.registry} answered {err.code}: {err.reason}") from err
        except OSError as exc:
            raise RegistryError(
                f"cannot reach the token service of {ref.registry} at {params['realm']}: {exc}"
            ) from exc
        token = data.get("token") or data.get("access_token")
        if not token:
            raise RegistryError(f"the token service of {ref.registry} gave no token")
        return f"Bearer {token}"

    def _needs_login(self, ref: Reference, refused: bool = False) -> RegistryError:
        what = "refused the stored credentials" if refused else "requires credentials"
        return RegistryError(
            f"{ref.registry} {what} for {ref.repository}. Log in with `docker login {ref.registry}` (or put "
            "them in $DOCKER_CONFIG/config.json or REGISTRY_AUTH_FILE), and check the image name."
        )

    def _error(self, ref: Reference, code: int, body: bytes, url: str) -> RegistryError:
        codes = _registry_errors(body)
        if "NAME_UNKNOWN" in codes or (code == 404 and "/manifests/" in url and not codes):
            return RegistryError(f"image {ref.registry}/{ref.repository} does not exist; check the name")
        if "MANIFEST_UNKNOWN" in codes or (code == 404 and "/manifests/" in url):
            what = f"tag {ref.tag!r}" if ref.tag and not ref.digest else f"digest {ref.digest}"
            return RegistryError(f"image {ref.registry}/{ref.repository} has no {what}; check the tag")
        if code in (401, 403) or "DENIED" in codes or "UNAUTHORIZED" in codes:
            return RegistryError(
                f"{ref.registry} denied access to {ref.repository} ({', '.join(codes) or code}): the image does not "
                f"exist, or it needs credentials (`docker login {ref.registry}`)"
            )
        if code == 404:
            return RegistryError(f"{ref}: {url} is not on the registry (404)")
        if code == 429:
            return RegistryError(f"{ref.registry} is rate limiting pulls (429); retry later or use a mirror")
        return RegistryError(f"{ref}: the registry answered {code} for {url}: {body[:200]!r}")

    # -- manifests -----------------------------------------------------------------------------
    def _missing(self, ref: Reference, exc: RegistryError) -> RegistryError:
        """A missing manifest: say whether the repository or only the tag is missing."""
        try:
            resp, _ = self._open(ref, "tags/list?n=20")
            with resp:
                tags = json.loads(resp.read()).get("tags") or []
        except (RegistryError, ValueError):
            return RegistryError(f"image {ref.registry}/{ref.repository} does not exist; check the name")
        if not tags:
            return RegistryError(f"image {ref.registry}/{ref.repository} does not exist; check the name")
        shown = ", ".join(sorted(tags)[:20])
        return RegistryError(f"{exc} (tags there include: {shown})")

    def manifest(self, ref: Reference, reference: str) -> tuple[dict[str, Any], str, bytes]:
        """The manifest (or index) at a tag or digest: (document, its digest, raw bytes)."""
        try:
            resp, _ = self._open(ref, f"manifests/{reference}", _ACCEPT)
        except RegistryError as exc:
            if "has no tag" in str(exc) or "does not exist" in str(exc):
                raise self._missing(ref, exc) from exc
            raise
        with resp:
            raw = resp.read()
            header_digest = resp.headers.get("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{ref}: the manifest served for {reference} has digest {digest}; refusing it")
        if header_digest and header_digest != digest and header_digest.startswith("sha256:"):
            raise RegistryError(f"{ref}: the manifest's digest {digest} differs from the registry's {header_digest}")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"{ref}: the registry sent a manifest that is not JSON") from exc
        return doc, digest, raw

    def resolve(self, ref: Reference) -> tuple[str, dict[str, Any]]:
        """The digest and document of the image manifest this host should run (an index is
        narrowed to this platform)."""
        doc, digest, _ = self.manifest(ref, ref.digest or ref.tag or "latest")
        media = doc.get("mediaType") or ("application/vnd.oci.image.index.v1+json" if "manifests" in doc else "")
        if media in INDEX_TYPES or "manifests" in doc:
            child = select_platform(doc, ref)
            doc, digest, _ = self.manifest(ref, child)
        if doc.get("schemaVersion") != 2 or "layers" not in doc:
            raise RegistryError(
                f"{ref}: unsupported manifest (schema {doc.get('schemaVersion')}, {media or 'no type'})"
            )
        return digest, doc

    # -- blobs ---------------------------------------------------------------------------------
    def blob(self, ref: Reference, digest: str) -> bytes:
        """A small blob (an image config), verified against its digest."""
        resp, _ = self._open(ref, f"blobs/{digest}")
        with resp:
            data = resp.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise RegistryError(f"{ref}: blob {digest} does not match its digest")
        return bytes(data)

    def download(self, ref: Reference, digest: str, size: int | None, out: IO[bytes]) -> None:
        """Stream blob ``digest`` into ``out``, verifying size and digest as it goes."""
        resp, _ = self._open(ref, f"blobs/{digest}")
        h, n = hashlib.sha256(), 0
        with resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        got = "sha256:" + h.hexdigest()
        if got != digest or (size is not None and n != size):
            raise RegistryError(
                f"layer {digest} of {ref} does not match its digest (got {got}, {n} bytes): the registry or something "
                "between it and here corrupted it. Nothing of it was kept; retry, or report it to the registry."
            )


def select_platform(index: dict[str, Any], ref: Reference) -> str:
    """The digest of the manifest for this host's platform in an image index."""
    want_os, want_arch, want_variant = host_platform()
    seen = []
    candidates = []
    for m in index.get("manifests") or []:
        p = m.get("platform") or {}
        seen.append("/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x))
        if p.get("os") == want_os and p.get("architecture") == want_arch:
            candidates.append((p.get("variant") in (want_variant, None), m["digest"]))
    if not candidates:
        here = "/".join(x for x in (want_os, want_arch, want_variant) if x)
        raise RegistryError(
            f"{ref} has no image for this platform ({here}); it has: {', '.join(s for s in seen if s) or 'none'}"
        )
    candidates.sort(key=lambda c: not c[0])
    return str(candidates[0][1])


def iter_layers(manifest: dict[str, Any]) -> Iterator[tuple[str, int | None, str]]:
    """(digest, size, media type) of each layer, bottom first."""
    for layer in manifest.get("layers") or []:
        yield str(layer["digest"]), layer.get("size"), str(layer.get("mediaType", ""))
