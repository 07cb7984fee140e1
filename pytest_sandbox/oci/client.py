"""A small OCI registry client: manifests, platform selection, token authentication, mirrors,
digest-verified blob downloads, and pushes (blobs that the registry lacks, then the manifest).
Standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import IO, Any

from ..errors import RegistryError
from .reference import ACCEPT, INDEX_TYPES, Reference, RegistryConfig, host_platform

__all__ = ["MAX_DOCUMENT", "MAX_ERROR_BODY", "RegistryClient", "select_platform"]

MAX_DOCUMENT = 4 << 20
"""The most bytes read of a manifest, an image config, a tag list or a token answer: real ones
are a few KiB, and a registry that sends without end must not fill the runner's memory."""
MAX_ERROR_BODY = 64 << 10
"""The most bytes read of an error answer (only its first lines are ever shown)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # followed by hand, so credentials never travel to the blob store's host


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _read_at_most(resp: Any, limit: int, what: str) -> bytes:
    """The body of ``resp``, refused with :class:`RegistryError` past ``limit`` bytes."""
    parts, n = [], 0
    while chunk := resp.read(min(1 << 20, limit + 1 - n)):
        parts.append(chunk)
        n += len(chunk)
        if n > limit:
            raise RegistryError(
                f"{what} is larger than {limit >> 10} KiB, far more than any real one: the registry (or something "
                "between it and here) sends without end. Check the registry address and the image name."
            )
    return b"".join(parts)


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
                return self._send(ref, "GET", f"{base}/v2/{ref.repository}/{path}", accept=accept), base
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

    def _send(
        self,
        ref: Reference,
        method: str,
        url: str,
        *,
        accept: str | None = None,
        body: Callable[[], Iterable[bytes] | bytes] | None = None,
        headers: dict[str, str] | None = None,
        push: bool = False,
        missing_ok: bool = False,
    ) -> Any:
        """One request, answering authentication challenges and following redirects by hand.
        ``body`` makes the request body afresh for each try (a retry after a challenge);
        ``missing_ok`` returns None for a 404 instead of raising."""
        scope = f"repository:{ref.repository}:pull,push" if push else f"repository:{ref.repository}:pull"
        host = urllib.parse.urlsplit(url).netloc
        for _ in range(6):  # an auth round, then redirects
            req = urllib.request.Request(url, data=body() if body else None, method=method)
            for name, value in (headers or {}).items():
                req.add_header(name, value)
            if accept:
                req.add_header("Accept", accept)
            token = self._tokens.get((host, scope))
            if token and urllib.parse.urlsplit(url).netloc == host:
                req.add_unredirected_header("Authorization", token)
            try:
                return self._opener.open(req, timeout=60)
            except urllib.error.HTTPError as err:
                with err:  # only the start of an error's body is ever shown: read no more
                    err_body = err.read(MAX_ERROR_BODY)
                if method in ("GET", "HEAD") and err.code in (301, 302, 303, 307, 308) and err.headers.get("Location"):
                    url = urllib.parse.urljoin(url, err.headers["Location"])
                    continue
                if err.code == 401 and not token:
                    self._tokens[(host, scope)] = self._authenticate(
                        ref, err.headers.get("WWW-Authenticate", ""), scope
                    )
                    continue
                if err.code == 401 and token and token.startswith("Basic "):  # the credentials we sent
                    raise self._needs_login(ref, refused=True) from err
                if err.code == 404 and missing_ok:
                    return None
                raise self._error(ref, err.code, err_body, url, method) from err
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
                data = json.loads(_read_at_most(resp, MAX_DOCUMENT, f"the token answer of {ref.registry}"))
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

    def _error(self, ref: Reference, code: int, body: bytes, url: str, method: str = "GET") -> RegistryError:
        codes = _registry_errors(body)
        if method not in ("GET", "HEAD"):
            why = ", ".join(codes) or str(code)
            hint = (
                f"log in with push rights (`docker login {ref.registry}`)"
                if code in (401, 403) or "DENIED" in codes or "UNAUTHORIZED" in codes
                else "check that the registry accepts pushes (not read-only, not a pull-through mirror)"
            )
            return RegistryError(
                f"{ref.registry} refused the push to {ref.repository} ({why}, at {method} {url}): {hint}. "
                "Nothing was tagged."
            )
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
                tags = json.loads(_read_at_most(resp, MAX_DOCUMENT, f"the tag list of {ref}")).get("tags") or []
        except (RegistryError, ValueError):
            return RegistryError(f"image {ref.registry}/{ref.repository} does not exist; check the name")
        if not tags:
            return RegistryError(f"image {ref.registry}/{ref.repository} does not exist; check the name")
        shown = ", ".join(sorted(tags)[:20])
        return RegistryError(f"{exc} (tags there include: {shown})")

    def manifest(self, ref: Reference, reference: str) -> tuple[dict[str, Any], str, bytes]:
        """The manifest (or index) at a tag or digest: (document, its digest, raw bytes)."""
        try:
            resp, _ = self._open(ref, f"manifests/{reference}", ACCEPT)
        except RegistryError as exc:
            if "has no tag" in str(exc) or "does not exist" in str(exc):
                raise self._missing(ref, exc) from exc
            raise
        with resp:
            raw = _read_at_most(resp, MAX_DOCUMENT, f"the manifest of {ref} at {reference}")
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
            data = _read_at_most(resp, MAX_DOCUMENT, f"blob {digest} of {ref} (an image config)")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise RegistryError(f"{ref}: blob {digest} does not match its digest")
        return bytes(data)

    def download(self, ref: Reference, digest: str, size: int | None, out: IO[bytes]) -> None:
        """Stream blob ``digest`` into ``out``, verifying size and digest as it goes."""
        resp, _ = self._open(ref, f"blobs/{digest}")
        h, n = hashlib.sha256(), 0
        try:
            with resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    n += len(chunk)
                    if size is not None and n > size:  # a blob cannot outgrow its descriptor
                        raise RegistryError(
                            f"the registry sent more than the {size} bytes layer {digest} of {ref} has; nothing of "
                            "it was kept. Check the registry, or the mirror in between."
                        )
                    out.write(chunk)
        except (http.client.HTTPException, OSError) as exc:
            raise RegistryError(
                f"the download of layer {digest} of {ref} broke off after {n} bytes ({exc!r}); nothing of it was kept. "
                "Retry; if it keeps happening, check the network or the registry."
            ) from exc
        got = "sha256:" + h.hexdigest()
        if got != digest or (size is not None and n != size):
            raise RegistryError(
                f"layer {digest} of {ref} does not match its digest (got {got}, {n} bytes): the registry or something "
                "between it and here corrupted it. Nothing of it was kept; retry, or report it to the registry."
            )

    # -- pushes --------------------------------------------------------------------------------
    def _push_base(self, ref: Reference) -> str:
        """Pushes go to the registry itself: mirrors serve pulls only."""
        return self.config.endpoints(ref.registry)[-1]

    def _push_send(self, ref: Reference, method: str, url: str, **kw: Any) -> Any:
        try:
            return self._send(ref, method, url, push=True, **kw)
        except OSError as exc:
            raise RegistryError(
                f"cannot reach the registry {ref.registry} to push: {getattr(exc, 'reason', exc)}. Check the address "
                "and the network."
            ) from exc

    def _head(self, ref: Reference, path: str, accept: str | None = None) -> bool:
        url = f"{self._push_base(ref)}/v2/{ref.repository}/{path}"
        resp = self._push_send(ref, "HEAD", url, accept=accept, missing_ok=True)
        if resp is None:
            return False
        resp.close()
        return True

    def has_blob(self, ref: Reference, digest: str) -> bool:
        """True when the repository of ``ref`` already holds blob ``digest`` (so it is not sent again)."""
        return self._head(ref, f"blobs/{digest}")

    def upload(self, ref: Reference, digest: str, size: int, chunks: Callable[[], Iterable[bytes]]) -> None:
        """Upload one blob (monolithic: POST for a session, PUT with the digest); the registry
        checks the digest, and refuses a body that does not match it."""
        base = self._push_base(ref)
        with self._push_send(ref, "POST", f"{base}/v2/{ref.repository}/blobs/uploads/", body=lambda: b"") as resp:
            location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{ref.registry} started an upload without a Location; it does not speak OCI pushes")
        url = urllib.parse.urljoin(f"{base}/v2/{ref.repository}/blobs/uploads/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self._push_send(ref, "PUT", url, body=chunks, headers=headers):
            pass

    def has_manifest(self, ref: Reference, tag: str) -> bool:
        """True when ``tag`` exists in the repository of ``ref`` (a HEAD: nothing is downloaded)."""
        return self._head(ref, f"manifests/{tag}", ACCEPT)

    def put_manifest(self, ref: Reference, tag: str, raw: bytes, media_type: str) -> str:
        """Tag ``raw`` (a manifest) as ``tag``; returns its digest."""
        url = f"{self._push_base(ref)}/v2/{ref.repository}/manifests/{tag}"
        with self._push_send(ref, "PUT", url, body=lambda: raw, headers={"Content-Type": media_type}):
            pass
        return "sha256:" + hashlib.sha256(raw).hexdigest()


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
