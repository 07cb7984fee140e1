"""A Daytona-compatible API on localhost, backed by any backend (``pytest-sandbox serve --daytona``).

The unmodified ``daytona`` SDK talks to it over HTTP: every response is built from the SDK's own API
models (``daytona_api_client`` and ``daytona_toolbox_api_client``), so what the SDK accepts here it
accepts from Daytona. Daytona-SDK code and agent experiments run offline and free against local
sandboxes, and the daytona backend of pytest-sandbox is tested against it.

Covered (REST under ``/api``, the toolbox under ``/toolbox/<sandbox id>``):

- snapshots: create from an image reference or a declarative image (FROM, RUN, ENV, WORKDIR),
  get, list, delete, build logs;
- sandboxes: create (from a snapshot, an image, or the default), get, list with a label filter,
  delete, start, stop, fork, create_snapshot, labels, auto-stop and auto-delete intervals, and
  preview links (a port of the sandbox on this machine's loopback, through the backend's expose);
- toolbox: ``process/execute``, and files (bulk upload and download, info, list, create folder,
  delete, move, permissions).

Not covered: sessions, PTY, git, LSP, code interpreter, computer use, volumes, signed previews,
and the socket.io event stream (the SDK falls back to polling). Image references resolve as the
plugin's marker resolves them: ``host`` is the host's /usr and /etc, ``debian:SUITE`` a Debian minbase built
locally with mmdebstrap, anything else a registry image.

Modules: :mod:`.dockerfile` (declarative images as recipes), :mod:`.records` (what is kept of
snapshots and sandboxes), :mod:`.state` (persistence, lookups, lifecycle on the backend, the
reaper) and :mod:`.toolbox` (commands and files), none of them HTTP; :mod:`.models` (the wire
format), :mod:`.app` (the aiohttp routes) and :mod:`.endpoint` (:class:`DaytonaServer`).
"""

from __future__ import annotations

from ..errors import EngineUnavailableError

try:  # the SDK's models shape every answer; aiohttp comes with the SDK
    import aiohttp  # noqa: F401
    import daytona_api_client  # noqa: F401
    import daytona_toolbox_api_client  # noqa: F401
except ImportError as exc:
    raise EngineUnavailableError(
        "the Daytona endpoint builds its answers from the SDK's models: pip install 'pytest-sandbox[daytona]'"
    ) from exc

from .endpoint import DaytonaServer  # after the check: its imports need the SDK

__all__ = ["DaytonaServer"]
