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


def rlimits_for(limits: Limits, prlimit: str | None) -> tuple[list[str], dict[str, LimitStatus]]:
    """The ``prlimit`` command line that every command of the sandbox starts through (util-linux,
    beside nsenter: one exec, no fork of ours), and how each limit is then held."""
    if prlimit is None:
        return [], {}
    opts: list[str] = []
    status: dict[str, LimitStatus] = {}
    if limits.pids is not None:
        n, note = _capped(resource.RLIMIT_NPROC, limits.pids)
        opts.append(f"--nproc={n}:{n}")
        status["pids"] = LimitStatus(
            "pids", limits.pids, True, f"rlimit RLIMIT_NPROC (all sandboxes of this backend together){note}"
        )
    mem = limits.memory_bytes
    if mem is not None:
        n, note = _capped(resource.RLIMIT_AS, mem)
        opts.append(f"--as={n}:{n}")
        status["memory"] = LimitStatus("memory", mem, True, f"rlimit RLIMIT_AS (address space per process){note}")
    return ([prlimit, *opts, "--"] if opts else []), status


def _capped(res: int, value: int) -> tuple[int, str]:
    """``value``, or the hard limit this process already runs under when that is lower: an
    unprivileged process cannot raise it, and a lower outer limit holds anyway."""
    hard = resource.getrlimit(res)[1]
    if hard != resource.RLIM_INFINITY and hard < value:
        return hard, f", capped at the {hard} this process already has"
    return value, ""
