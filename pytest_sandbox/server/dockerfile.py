"""The declarative images the Daytona SDK sends (a Dockerfile) as the recipes the engine builds."""

from __future__ import annotations

import re
import shlex

from ..errors import ConfigError
from ..image import Image

__all__ = ["dockerfile_image"]

# Metadata only: sandboxes here run commands through the toolbox, never an entrypoint.
_IGNORED = ("CMD", "ENTRYPOINT", "LABEL", "USER", "EXPOSE", "SHELL", "ARG")


def dockerfile_image(text: str) -> Image:
    """The recipe a declarative Daytona image (its Dockerfile) describes: FROM, RUN, ENV, WORKDIR.

    FROM takes what a client may name (:meth:`Image.from_ref` with ``host_paths=False``): a
    registry reference or ``debian:SUITE``, never a path or the host of the endpoint. COPY and ADD
    need Daytona's object storage for their context and are refused with a clear error.
    """
    image: Image | None = None
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            if not rest:
                raise ConfigError("FROM needs an image reference")
            image = Image.from_ref(rest.split()[0], host_paths=False)
            continue
        if image is None:
            raise ConfigError(f"the image must start with FROM, not {line!r}")
        if op == "RUN":
            image = image.run(rest)
        elif op == "ENV":
            image = image.env(**_env_pairs(rest))
        elif op == "WORKDIR":
            image = image.workdir(rest)
        elif op in _IGNORED:
            continue
        else:
            raise ConfigError(f"{op} is not supported by the local Daytona endpoint (FROM, RUN, ENV, WORKDIR are)")
    if image is None:
        raise ConfigError("the image has no FROM line")
    return image


def _env_pairs(rest: str) -> dict[str, str]:
    # Both forms Docker accepts: ``ENV K V`` and ``ENV K1=V1 K2=V2``. Malformed lines are the
    # client's mistake (a 400), not a crash of the parser.
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"ENV {rest!r}: {exc}") from exc
    if len(words) == 2 and "=" not in words[0]:
        return {words[0]: words[1]}
    if not words or any("=" not in w for w in words):
        raise ConfigError(f"ENV {rest!r}: expected KEY VALUE or KEY=VALUE pairs")
    return dict(w.split("=", 1) for w in words)
