"""How the daytona backend speaks to the SDK, for its sync and async calls alike: the command
wrapper an exec runs in, reading its result back, killing it, and the SDK's errors translated
into ones that say what to do."""

from __future__ import annotations

import base64
import shlex
from collections.abc import Sequence
from typing import Any

from .._proc import CLIP_SH
from ..errors import ConfigError, EngineUnavailableError, SandboxError
from ._base import KILL_TREE_SH

__all__ = ["RETRIES", "kill_command", "retry_delay", "translate", "unwrap", "wrap"]

# Daytona's process.exec returns one output stream and no stdin, so a wrapper in the sandbox keeps
# stdout and stderr apart in files, feeds stdin from an uploaded file, enforces the timeout by
# killing the command's whole tree (found through /proc), and prints a framed, base64 result.
# Output is cut to max_output in the sandbox (clip), so the runner never receives more of it.
# Its pid is kept in a file, so that a cancelled exec's tree can be killed from outside.
_WRAP = (
    CLIP_SH
    + r"""
i=$1; c=$2; t=$3; k=$4; L=$5; shift 5; d=/tmp/.psb-$i; echo $$ >$d.pid
if [ -e $d.cancel ]; then rm -f $d.*; exit 0; fi
if [ -e $d.in ]; then in=$d.in; else in=/dev/null; fi
if [ -n "$c" ] && ! cd -- "$c" 2>$d.err; then rc=125; : >$d.out
elif [ -z "$t" ]; then "$@" >$d.out 2>$d.err <$in; rc=$?
else
  "$@" >$d.out 2>$d.err <$in & p=$!
  ( sleep "$t" && kill -0 $p && : >$d.to && sh -c "$k" sh $p ) >/dev/null 2>&1 </dev/null & w=$!
  wait $p; rc=$?
  sh -c "$k" sh $w
fi
if [ -e $d.to ]; then to=1; else to=0; fi
printf '\npsb-%s %s %s\n' "$i" "$rc" "$to"
clip $d.out $L | base64 | tr -d '\n'; echo; clip $d.err $L | base64 | tr -d '\n'; echo
rm -f $d.out $d.err $d.in $d.to $d.pid
"""
)


def wrap(tag: str, argv: Sequence[str], cwd: str, timeout: float | None, max_output: int) -> str:
    """The command line that runs ``argv`` in the wrapper, as exec ``tag``."""
    t = "" if timeout is None else f"{max(timeout, 0.001):.3f}"
    return shlex.join(["/bin/sh", "-c", _WRAP, "sh", tag, cwd, t, KILL_TREE_SH, str(max_output), *argv])


def unwrap(tag: str, text: str, sandbox_id: str) -> tuple[int, bool, bytes, bytes]:
    """Exit code, timed out, stdout and stderr, from what the wrapper of exec ``tag`` printed."""
    lines = text.split("\n")
    marker = f"psb-{tag} "
    at = max((n for n, line in enumerate(lines) if line.startswith(marker)), default=-1)
    if at < 0:
        raise SandboxError(
            f"the command wrapper in sandbox {sandbox_id} gave no result (does the image have sh, base64 "
            f"and tr?): {text!r:.500}"
        )
    _, code, timed_out = lines[at].split()
    out_b64, err_b64 = [*lines[at + 1 : at + 3], "", ""][:2]
    return int(code), timed_out == "1", base64.b64decode(out_b64), base64.b64decode(err_b64)


def kill_command(tag: str) -> str:
    """The command that kills exec ``tag``'s whole tree (the wrapper first) and removes its files."""
    # A cancel can come before the wrapper has started (a busy machine or API). The wrapper writes
    # its pid and then looks for the cancel mark; this writes the mark and then looks for the pid:
    # one of the two sees the other's, so the command is killed or never runs. Without a pid within
    # two seconds the mark stays, for a wrapper that starts later.
    d = f"/tmp/.psb-{tag}"
    wait = f": >{d}.cancel; n=0; while [ ! -s {d}.pid ] && [ $n -lt 40 ]; do sleep 0.05; n=$((n + 1)); done"
    kill = f'sh -c {shlex.quote(KILL_TREE_SH)} sh "$(cat {d}.pid)"'
    return shlex.join(["/bin/sh", "-c", f"{wait}; if [ -s {d}.pid ]; then {kill}; rm -f {d}.*; fi"])


def _is_connection_error(exc: BaseException) -> bool:
    chain: BaseException | None = exc
    while chain is not None:
        name = type(chain).__name__
        if isinstance(chain, (ConnectionError, TimeoutError)) or "NewConnectionError" in name or "Connector" in name:
            return True
        chain = chain.__cause__ or chain.__context__
    return "Connection refused" in str(exc) or "Max retries exceeded" in str(exc)


def _is_refused(exc: BaseException) -> bool:
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, ConnectionRefusedError) or "Connector" in type(chain).__name__:
            return True
        chain = chain.__cause__ or chain.__context__
    return "Connection refused" in str(exc)


def translate(sdk: Any, exc: Exception, what: str, api_url: str, target: str | None) -> Exception | None:
    """The error to raise for an SDK call that failed while trying to ``what``: None when the API
    was rate limiting (back off and retry), ``exc`` itself when it is not the SDK's."""
    if isinstance(exc, sdk.DaytonaRateLimitError):
        return None
    if isinstance(exc, sdk.DaytonaAuthenticationError):
        return ConfigError(
            f"Daytona refused the credentials while trying to {what}: {exc}. "
            "Check DAYTONA_API_KEY (and DAYTONA_API_URL)."
        )
    if isinstance(exc, sdk.DaytonaConnectionTimeoutError) and not _is_refused(exc):
        # The API took the request and gave no answer within the call's time limit (an exec's is
        # its timeout plus a minute): a command the sandbox could not end is the likely cause.
        return EngineUnavailableError(
            f"the Daytona API at {api_url} did not answer in time while trying to {what} ({exc}). If it is "
            "up, the sandbox is stuck (a command it could not end, e.g. at its process limit): delete it."
        )
    if isinstance(exc, sdk.DaytonaConnectionError) or (isinstance(exc, sdk.DaytonaError) and _is_connection_error(exc)):
        return EngineUnavailableError(
            f"no Daytona API answers at {api_url} ({exc}). Check DAYTONA_API_URL, or start a local one with "
            "`pytest-sandbox serve`."
        )
    if (
        isinstance(exc, sdk.DaytonaBadRequestError)
        and target
        and any(w in str(exc).lower() for w in ("target", "region"))
    ):
        return ConfigError(
            f"Daytona does not offer the target DAYTONA_TARGET={target!r}: {exc}. "
            "Unset DAYTONA_TARGET or pick one of your organization's regions."
        )
    if isinstance(exc, sdk.DaytonaError):
        return SandboxError(f"Daytona could not {what}: {exc}")
    return exc


RETRIES = 12
"""Attempts of one SDK call while the API rate limits."""


def retry_delay(sdk: Any, exc: Exception, what: str, api_url: str, target: str | None, attempt: int) -> float:
    """Seconds to back off before attempt ``attempt + 1`` of a call that failed with ``exc``
    (rate limited), or the error to raise instead (:func:`translate`'s, or ``exc`` itself)."""
    err = translate(sdk, exc, what, api_url, target)
    if err is None and attempt < RETRIES - 1:
        return min(0.25 * 2.0**attempt, 10.0)
    if err is None or err is exc:
        raise exc
    raise err from exc
