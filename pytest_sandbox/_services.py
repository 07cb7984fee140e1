"""Running a recipe's services in a sandbox of any backend: start, wait until ready, stop cleanly.

Everything happens inside the sandbox through ``exec``, one command per service and phase: the
ready check is polled by a shell loop in there (every 10 ms), not by round trips from the runner.
A service runs in a session of its own, so a default stop signals its whole process group; its
output goes to ``/run/pytest-sandbox/<name>.log``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from .errors import ExecTimeoutError, ServiceError
from .image import Service
from .types import ServiceStatus

__all__ = ["SERVICE_DIR", "log_tail", "start", "status", "stop_all"]

SERVICE_DIR = "/run/pytest-sandbox"
_LOG_TAIL = 4000
_READ_TIMEOUT = 10.0  # for reading a log: sandbox code can make it a FIFO that blocks the read
_STATUS_MARGIN = 10.0  # a status runs each ready check once: their timeouts, and this

# $1 name, $2 start, $3 ready. Exit 0 once ready; 97 when start itself failed first. Without a
# ready check, ready means running: its session exists (setsid runs a moment after the fork).
_START_SH = f"""
d={SERVICE_DIR}; n=$1
mkdir -p "$d" || exit 125
rm -f "$d/$n.exit"
setsid /bin/sh -c '/bin/sh -c "$1"; echo $? > "$2"' sh "$2" "$d/$n.exit" </dev/null >>"$d/$n.log" 2>&1 &
p=$!
echo $p > "$d/$n.pid"
if [ -z "$3" ]; then  # no ready check: ready once it runs (its session made), or ended well already
    until kill -0 "-$p" 2>/dev/null; do
        if [ -s "$d/$n.exit" ]; then [ "$(cat "$d/$n.exit")" = 0 ] && exit 0; exit 97; fi
        sleep 0.01
    done
    exit 0
fi
while :; do
    /bin/sh -c "$3" </dev/null >/dev/null 2>&1 && exit 0
    if [ -s "$d/$n.exit" ] && [ "$(cat "$d/$n.exit")" != 0 ]; then exit 97; fi
    sleep 0.01
done
"""

# $1 name, $2 stop (or empty), $3 grace in steps of 20 ms. The stop command first; then whatever
# is left of the service's process group gets SIGTERM, and SIGKILL when the grace runs out.
_STOP_SH = f"""
d={SERVICE_DIR}; n=$1
[ -z "$2" ] || /bin/sh -c "$2" </dev/null >>"$d/$n.log" 2>&1
pid=$(cat "$d/$n.pid" 2>/dev/null) || exit 0
# Nothing of this run goes into a snapshot: the next start begins a fresh log.
rm -f "$d/$n.pid" "$d/$n.exit" "$d/$n.log"
kill -TERM "-$pid" 2>/dev/null || exit 0
i=0
while kill -0 "-$pid" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -ge "$3" ]; then kill -KILL "-$pid" 2>/dev/null; exit 0; fi
    sleep 0.02
done
"""


def log_tail(sb: Any, svc: Service) -> str:
    """The last few KiB of a service's output (the log is the sandbox's: read within a bound)."""
    argv = ["/bin/sh", "-c", f'tail -c {_LOG_TAIL} "{SERVICE_DIR}/$1.log" 2>/dev/null', "sh", svc.name]
    try:
        return str(sb.exec(argv, timeout=_READ_TIMEOUT).stdout)
    except ExecTimeoutError:
        return f"(its log could not be read within {_READ_TIMEOUT:g} s)"


def start(sb: Any, svc: Service, snapshot: str) -> None:
    """Start ``svc`` in ``sb`` and wait until its ready check passes; a :class:`ServiceError`
    with its log when it fails first or the timeout runs out."""
    try:
        res = sb.exec(["/bin/sh", "-c", _START_SH, "sh", svc.name, svc.start, svc.ready or ""], timeout=svc.timeout)
    except ExecTimeoutError:
        raise ServiceError(
            svc.name,
            snapshot,
            f"was not ready within {svc.timeout:g} s (ready: {svc.ready})",
            log_tail(sb, svc),
        ) from None
    if res.exit_code == 97:
        raise ServiceError(svc.name, snapshot, f"failed to start (start: {svc.start})", log_tail(sb, svc))
    if res.exit_code != 0:
        raise ServiceError(svc.name, snapshot, f"could not be started: {res.stderr.strip()}", log_tail(sb, svc))


def stop_all(sb: Any, services: Sequence[Service]) -> None:
    """Stop ``services`` cleanly, the last started first."""
    for svc in reversed(services):
        steps = max(1, int(svc.grace / 0.02))
        sb.exec(["/bin/sh", "-c", _STOP_SH, "sh", svc.name, svc.stop or "", str(steps)], timeout=svc.grace + 60)


def status(sb: Any, services: Sequence[Service]) -> dict[str, ServiceStatus]:
    """Each service's state now (its ready check, or whether its process group lives) and log."""
    if not services:
        return {}
    checks = []
    for svc in services:
        name = shlex.quote(svc.name)
        alive = f'[ -s {SERVICE_DIR}/{name}.pid ] && kill -0 "-$(cat {SERVICE_DIR}/{name}.pid)" 2>/dev/null'
        check = f"/bin/sh -c {shlex.quote(svc.ready)} </dev/null >/dev/null 2>&1" if svc.ready else alive
        ran = f"[ -e {SERVICE_DIR}/{name}.pid ]"
        checks.append(f"if {check}; then echo ready; elif {ran}; then echo 'not ready'; else echo stopped; fi")
    # Each ready check is the recipe's, on files sandbox code may have changed (a FIFO blocks).
    bound = sum(svc.timeout for svc in services) + _STATUS_MARGIN
    try:
        states = sb.exec(["/bin/sh", "-c", "\n".join(checks)], timeout=bound).stdout.splitlines()
    except ExecTimeoutError:
        states = ["not ready"] * len(services)
    out = {}
    for svc, state in zip(services, states + ["stopped"] * len(services), strict=False):
        out[svc.name] = ServiceStatus(svc.name, state, log_tail(sb, svc))
    return out
