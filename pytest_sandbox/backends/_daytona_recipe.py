"""How a recipe maps onto Daytona: the remote snapshot of each setup key (its name carries the
sizes it was made with) and the env, workdir and parent each prefix of the steps has there.
Pure logic, no SDK."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..image import Image
from ..types import Limits

__all__ = ["GIB", "PREFIX", "recipe_meta", "remote_name", "resources_of", "sizes_tag"]

PREFIX = "pytest-sandbox-"


def remote_name(key: str, sizes: str = "") -> str:
    return PREFIX + key + sizes


GIB = 1 << 30


def resources_of(limits: Limits) -> dict[str, int]:
    """``limits`` as Daytona sizes a sandbox: whole cores, whole GiB of memory and of disk
    (rounded up). Only the limits given: Daytona's own defaults hold for the rest."""
    out = {}
    if limits.cpus is not None:
        out["cpu"] = max(1, math.ceil(limits.cpus))
    if limits.memory_bytes is not None:
        out["memory"] = max(1, -(-limits.memory_bytes // GIB))
    if limits.disk_bytes is not None:
        out["disk"] = max(1, -(-limits.disk_bytes // GIB))
    return out


def sizes_tag(resources: Mapping[str, int]) -> str:
    """The part of a remote snapshot name that says its resources: the same recipe with other
    sizes is another Daytona snapshot, not the cached one of other sizes."""
    return "".join(f"-{k[0]}{v}" for k, v in sorted(resources.items()))


def recipe_meta(image: Image, sizes: str = "") -> list[dict[str, Any]]:
    """Per prefix of the steps: its env, workdir, description, parent key and the Daytona snapshot
    holding its files (steps that only set env share their parent's)."""
    keys = image.prefix_keys()
    env: dict[str, str] = {}
    workdir = "/"
    remote = remote_name(keys[0], sizes)
    rows: list[dict[str, Any]] = [
        {
            "env": {},
            "workdir": "/",
            "remote": remote,
            "parent": None,
            "description": image.describe().splitlines()[0],
        }
    ]
    for i, step in enumerate(image.steps, start=1):
        if step.kind == "env":
            env = {**env, **dict(step.env)}
        else:
            remote = remote_name(keys[i], sizes)
        if step.kind == "workdir":
            workdir = str(step.args[0])
        rows.append(
            {
                "env": dict(env),
                "workdir": workdir,
                "remote": remote,
                "parent": keys[i - 1],
                "description": step.describe(),
            }
        )
    return rows
