"""OCI registries: image references, configuration and credentials (:mod:`.reference`), and the
client that fetches manifests and blobs (:mod:`.client`). Below the engine; no backend here."""

from __future__ import annotations

from .client import RegistryClient, select_platform
from .reference import Reference, RegistryConfig, host_platform

__all__ = ["Reference", "RegistryClient", "RegistryConfig", "host_platform", "select_platform"]
