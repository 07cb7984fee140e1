"""Limits where no cgroup can hold them: rlimits for what they cover, and saying what is not held.

Rootless on a machine that delegates no cgroup (cgroup v1, or v2 without a systemd user session)
the engine cannot limit a sandbox as a whole. rlimits, set on every command as it enters, cover:
``pids`` as ``RLIMIT_NPROC`` (counted per user in the user namespace: every sandbox of this
backend together, not each one) and ``memory`` as ``RLIMIT_AS`` (per process: an allocation past
it fails with ENOMEM instead of the sandbox being OOM-killed). CPU time and disk are not covered.
"""

from __future__ import annotations

from ..types import Limits, LimitStatus

__all__ = ["rlimits_for"]


def rlimits_for(limits: Limits, prlimit: str | None) -> tuple[list[str], dict[str, LimitStatus]]:
    """The ``prlimit`` command line that every command of the sandbox starts through (util-linux,
    beside nsenter: one exec, no fork of ours), and how each limit is then held."""
    if prlimit is None:
        return [], {}
    opts: list[str] = []
    status: dict[str, LimitStatus] = {}
    if limits.pids is not None:
        opts.append(f"--nproc={limits.pids}:{limits.pids}")
        status["pids"] = LimitStatus(
            "pids", limits.pids, True, "rlimit RLIMIT_NPROC (all sandboxes of this backend together)"
        )
    mem = limits.memory_bytes
    if mem is not None:
        opts.append(f"--as={mem}:{mem}")
        status["memory"] = LimitStatus("memory", mem, True, "rlimit RLIMIT_AS (address space per process)")
    return ([prlimit, *opts, "--"] if opts else []), status
