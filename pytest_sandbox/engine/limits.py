"""Limits where no cgroup can hold them: rlimits for what they cover, and saying what is not held.

Rootless on a machine that delegates no cgroup (cgroup v1, or v2 without a systemd user session)
the engine cannot limit a sandbox as a whole. rlimits, set on every command as it enters, cover:
``pids`` as ``RLIMIT_NPROC`` and ``memory`` as ``RLIMIT_AS`` (per process: an allocation past it
fails with ENOMEM instead of the sandbox being OOM-killed). CPU time and disk are not covered.

The kernel counts ``RLIMIT_NPROC`` per user per user namespace, and in every namespace above
(against the limit its creator had). Rootless, each sandbox has a user namespace of its own inside
the backend's, so its ``pids`` limit is its own; the backend's namespace is made under
:func:`sandbox_share`, so all sandboxes together leave the runner a share of the user's limit.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Protocol

from ..types import Limits, LimitStatus

__all__ = ["apply_to_running", "rlimit_values", "rlimits_for", "sandbox_share"]


class _Adopting(Protocol):
    def adopt(self, pids: list[int]) -> None: ...


def _rlimits(limits: Limits) -> list[tuple[str, int, int, int, str]]:
    """``(limit name, resource, value asked, value set, note)`` for each limit an rlimit holds
    (the value set is capped: see _capped)."""
    wanted = [("pids", resource.RLIMIT_NPROC, limits.pids), ("memory", resource.RLIMIT_AS, limits.memory_bytes)]
    return [(name, res, value, *_capped(res, value)) for name, res, value in wanted if value is not None]


def rlimit_values(limits: Limits) -> list[tuple[int, int]]:
    """The ``(resource, value)`` pairs :func:`rlimits_for` sets, for processes already running."""
    return [(res, value) for _, res, _, value, _ in _rlimits(limits)]


def apply_to_running(init: int, limits: Limits, cgroup: _Adopting | None, rlimits: bool) -> None:
    """Put a sandbox's init (``init``) and its holder, the only processes it has at start, under
    its limits: its ``cgroup``, else (``rlimits``) the rlimits its commands get. bwrap starts them
    from the runner, outside both, and sandbox code can ptrace them (they are its own processes):
    a child forced out of either would fork and allocate past every limit."""
    pids = [init]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{init}/task/{init}/children").read_text().split()]
    if cgroup is not None:
        cgroup.adopt(pids)
    elif rlimits:
        for pid in pids:
            for res, value in rlimit_values(limits):
                resource.prlimit(pid, res, (value, value))


# prlimit's option and what sb.limits says, for each limit an rlimit holds
_HOW = {
    "pids": ("nproc", "rlimit RLIMIT_NPROC (in the sandbox's own user namespace)"),
    "memory": ("as", "rlimit RLIMIT_AS (address space per process)"),
}


def rlimits_for(limits: Limits, prlimit: str | None) -> tuple[list[str], dict[str, LimitStatus]]:
    """The ``prlimit`` command line that every command of the sandbox starts through (util-linux,
    beside nsenter: one exec, no fork of ours), and how each limit is then held."""
    if prlimit is None:
        return [], {}
    opts: list[str] = []
    status: dict[str, LimitStatus] = {}
    for name, _, asked, n, note in _rlimits(limits):
        option, how = _HOW[name]
        opts.append(f"--{option}={n}:{n}")
        status[name] = LimitStatus(name, asked, True, f"{how}{note}")
    return ([prlimit, *opts, "--"] if opts else []), status


def _capped(res: int, value: int) -> tuple[int, str]:
    """``value``, or the hard limit this process already runs under when that is lower: an
    unprivileged process cannot raise it, and a lower outer limit holds anyway. ``RLIMIT_NPROC``
    is capped at :func:`sandbox_share`."""
    hard = resource.getrlimit(res)[1]
    if hard == resource.RLIM_INFINITY:
        return value, ""
    if res == resource.RLIMIT_NPROC:
        share = sandbox_share()
        if share is not None and share < value:
            return share, f", capped at {share}: the user's limit is {hard}, the rest is the runner's"
    elif hard < value:
        return hard, f", capped at the {hard} this process already has"
    return value, ""


def sandbox_share() -> int | None:
    """How many processes of the user sandboxes may have together (None: no limit to share).

    ``RLIMIT_NPROC`` counts all of the user's processes, the runner's included: sandboxes that
    used them all up would leave the runner unable to start a thread or a command (its next exec,
    its close). Sandboxes get at most three quarters of the hard limit; the runner keeps the rest,
    at least 64."""
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if hard == resource.RLIM_INFINITY:
        return None
    return max(hard - max(64, hard // 4), 1)
