"""Limits where no cgroup can hold them: rlimits for what they cover, and saying what is not held.

Rootless on a machine that delegates no cgroup (cgroup v1, or v2 without a systemd user session)
the engine cannot limit a sandbox as a whole. rlimits, set on every command as it enters, cover:
``pids`` as ``RLIMIT_NPROC`` (counted per user in the user namespace: every sandbox of this
backend together, not each one) and ``memory`` as ``RLIMIT_AS`` (per process: an allocation past
it fails with ENOMEM instead of the sandbox being OOM-killed). CPU time and disk are not covered.
"""

from __future__ import annotations

import resource

from ..types import Limits, LimitStatus

__all__ = ["rlimits_for"]


def rlimits_for(limits: Limits) -> tuple[list[tuple[int, int, int]], dict[str, LimitStatus]]:
    """The rlimits standing in for ``limits``, and how each limit is then held."""
    rl: list[tuple[int, int, int]] = []
    status: dict[str, LimitStatus] = {}
    if limits.pids is not None:
        rl.append((resource.RLIMIT_NPROC, limits.pids, limits.pids))
        status["pids"] = LimitStatus(
            "pids", limits.pids, True, "rlimit RLIMIT_NPROC (all sandboxes of this backend together)"
        )
    mem = limits.memory_bytes
    if mem is not None:
        rl.append((resource.RLIMIT_AS, mem, mem))
        status["memory"] = LimitStatus("memory", mem, True, "rlimit RLIMIT_AS (address space per process)")
    return rl, status
