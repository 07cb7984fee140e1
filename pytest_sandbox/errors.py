"""The one error hierarchy of pytest-sandbox.

Every error the library raises on purpose is a :class:`SandboxError`; each message says what
to do next. Lower-layer errors (``OSError``, ``subprocess`` failures, SDK exceptions) are
translated at the boundary and chained with ``raise ... from exc``::

    SandboxError
    ├── ConfigError              bad input: an option, a recipe, a path; fix the call
    ├── EngineUnavailableError   this backend cannot run here (no bwrap, no user namespaces, ...)
    ├── SnapshotBuildError       a recipe step failed; carries step, exit code and output tail
    ├── SnapshotNotFoundError    no snapshot with that key or name
    ├── SandboxClosedError       the sandbox was closed (or its processes died)
    ├── ExecError                ExecResult.check() on a non-zero exit; carries the result
    │   └── ExecTimeoutError     exec() ran past its timeout; the process tree was killed
    ├── SandboxFileError         an fs operation failed inside the sandbox (missing path, ...)
    ├── ServiceError             a recipe's service did not start or become ready; carries its log
    └── RegistryError            a container registry refused, failed or sent something wrong

This module imports nothing of the package, so every other module can import it.
"""

from __future__ import annotations

import threading
import warnings
from typing import Protocol

__all__ = [
    "ConfigError",
    "EngineUnavailableError",
    "ExecError",
    "ServiceError",
    "ExecTimeoutError",
    "LimitWarning",
    "RegistryError",
    "SandboxClosedError",
    "SandboxError",
    "SandboxFileError",
    "SnapshotBuildError",
    "SnapshotNotFoundError",
]


def tail(text: str, lines: int = 20) -> str:
    """The last ``lines`` lines of ``text``: what a reader needs to see why something failed."""
    parts = text.rstrip("\n").splitlines()
    return "\n".join(parts[-lines:])


class _Outcome(Protocol):
    """What :class:`ExecError` reads of an ``ExecResult`` (named structurally, so that this module
    needs no import of the types that carry it)."""

    @property
    def command(self) -> str: ...
    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


class SandboxError(Exception):
    """Base class of every error pytest-sandbox raises on purpose."""


class ConfigError(SandboxError, ValueError):
    """Bad input: an option value, a recipe argument or a path. The message names the fix."""


class EngineUnavailableError(SandboxError):
    """The chosen backend cannot run on this machine; the message says what to install or change."""


class SnapshotNotFoundError(SandboxError, KeyError):
    """No snapshot matches the key or name that was asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "snapshot not found"


class SandboxClosedError(SandboxError):
    """The sandbox was closed, or its processes are gone; create a new one."""


class SnapshotError(SandboxError):
    """A snapshot of a running sandbox could not be taken (a live snapshot: a process or mount
    the checkpoint cannot keep, named in the message). The sandbox runs on; nothing was cached."""


class SandboxFileError(SandboxError, OSError):
    """A file operation inside a sandbox failed (missing path, not a directory, ...)."""


class SnapshotBuildError(SandboxError):
    """A recipe step failed while its snapshot was being built. Nothing was cached for it."""

    def __init__(
        self,
        *,
        key: str,
        step_index: int,
        step_count: int,
        step: str,
        exit_code: int | None,
        output: str,
        reason: str = "",
    ) -> None:
        self.key = key
        self.step_index = step_index
        self.step_count = step_count
        self.step = step
        self.exit_code = exit_code
        self.output = output
        self.reason = reason
        code = "; ".join(x for x in (f"exit code {exit_code}" if exit_code is not None else "", reason) if x)
        out = tail(output)
        msg = (
            f"{'the base' if step_index == 0 else f'step {step_index}/{step_count}'} `{step}` failed ({code}) "
            "while building snapshot "
            f"{key[:12]}; nothing was cached. Fix the step and run again."
        )
        if out:
            msg += "\n--- output (tail) ---\n" + out
        super().__init__(msg)


class ExecError(SandboxError):
    """A command in a sandbox exited non-zero where success was required (``ExecResult.check``)."""

    result: _Outcome  # an ExecResult

    def __init__(self, result: _Outcome, message: str | None = None) -> None:
        self.result = result
        if message is None:
            message = f"`{result.command}` exited with code {result.exit_code}"
            out = tail(result.stdout + result.stderr)
            if out:
                message += "\n--- output (tail) ---\n" + out
        super().__init__(message)


class ExecTimeoutError(ExecError, TimeoutError):
    """``exec`` ran past its timeout: every process the command started was killed.

    ``result`` holds the output captured until then.
    """


class ServiceError(SandboxError):
    """A service of a snapshot failed to start or to become ready; ``log`` is the tail of its
    output. Raised once per snapshot and then again at once, not after another wait."""

    def __init__(self, name: str, snapshot: str, reason: str, log: str = "") -> None:
        self.name, self.snapshot, self.reason, self.log = name, snapshot, reason, log
        msg = f"service {name!r} of snapshot {snapshot} {reason}"
        msg += "; fix its start or ready command in the recipe (Image.service), or raise its timeout="
        if log.strip():
            msg += "\n--- its output (last lines) ---\n" + log.rstrip()
        super().__init__(msg)


class LimitWarning(UserWarning):
    """A resource limit asked for cannot be enforced on this machine (said once per process)."""


class RegistryError(SandboxError):
    """A container registry refused a request, failed, or sent content that does not check out."""


_said: set[str] = set()
_said_lock = threading.Lock()


def say_once(message: str) -> None:
    """Warn (:class:`LimitWarning`) about limits that are not held, once per process per message."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    warnings.warn(f"pytest-sandbox: {message}", LimitWarning, stacklevel=3)
