"""The one grammar of registry image references, ``[REGISTRY/]NAME[:TAG][@sha256:DIGEST]``, as
Docker's reference grammar has it (distribution/reference), normalised as Docker does
(``python:3.12`` is ``docker.io/library/python:3.12``).

Every reference that reaches a registry client, a URL or a command line is parsed here first:
a registry is a host name or address with an optional port, never anything a URL or a command
would read otherwise. Core module: standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["DOCKER_HUB", "Reference"]

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
# A host name (labels of letters, digits and inner '-'), an IPv4 address, or an IPv6 one in
# brackets; then an optional port.
_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_REGISTRY = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?\Z")


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
        if not isinstance(ref, str) or not ref or ref.startswith("-") or any(ord(c) < 0x21 or c == "\x7f" for c in ref):
            raise ConfigError(f"image reference {ref!r} is not valid; use e.g. 'python:3.12-slim'")
        rest, _, digest = ref.partition("@")
        if digest and not _DIGEST.match(digest):
            raise ConfigError(f"image reference {ref!r}: the digest must look like sha256:<64 hex digits>")
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, remainder
            if not _REGISTRY.match(registry) or (registry.rpartition(":")[2].isdigit() and not _port_ok(registry)):
                raise ConfigError(
                    f"image reference {ref!r}: {registry!r} is not a registry host (a name or address, with an "
                    "optional port, like registry.example:5000)"
                )
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


def _port_ok(registry: str) -> bool:
    port = registry.rpartition(":")[2]
    return 0 < int(port) < 65536
