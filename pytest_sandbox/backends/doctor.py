"""``pytest-sandbox doctor``: what works on this machine, and for what does not, the fix.

Each check runs the real thing where it can: the local engine starts a sandbox of the host base
in the cache and runs a command in it; Docker is asked over its API. What the engine found while
starting (cgroups, the network uplink, CRIU, disk images) is read off the engine itself, so the
doctor says what a test run would do, not what a separate probe guesses.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SandboxError

__all__ = ["Check", "diagnose"]


@dataclass(frozen=True)
class Check:
    """One line of the report. ``ok`` is True (works), False (does not; ``fix`` says what to
    do) or None (optional, and not set up here)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[self.ok]
        text = f"{mark} {self.name}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.fix else "")


def _ids() -> Check:
    from ..engine.ids import root_map, subordinate

    uid = os.geteuid()
    ids = root_map()
    if ids is not None:
        return Check(
            "user ids",
            True,
            f"as root: ids 0-{ids.count - 1} inside are the unprivileged host ids {ids.uid_base}-"
            f"{ids.uid_base + ids.count - 1} (the pytest-sandbox entry of /etc/subuid, or a range no distribution "
            "hands out)",
        )
    if uid == 0:
        return Check("user ids", None, "root of a user namespace that maps only itself: sandboxes map root alone")
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    sub = subordinate("/etc/subuid", user, str(uid)), subordinate("/etc/subgid", user, str(uid))
    tools = [t for t in ("newuidmap", "newgidmap") if shutil.which(t) is None]
    if sub[0] and sub[1] and not tools:
        return Check(
            "user ids",
            None,
            f"rootless: sandboxes map your id alone (root inside is you); {user} has subordinate ids "
            f"{sub[0][0]}-{sub[0][0] + sub[0][1] - 1}, which sandboxes do not use yet",
        )
    fix = []
    if not (sub[0] and sub[1]):
        fix.append(f"sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}")
    if tools:
        fix.append("apt-get install uidmap")
    return Check(
        "user ids",
        None,
        f"rootless: sandboxes map your id alone (root inside is you); no subordinate range of 65536 ids "
        f"for {user}" + (f" and no {' or '.join(tools)}" if tools else ""),
        "; ".join(fix),
    )


def _engine(cache_dir: str | None) -> tuple[list[Check], Any]:
    """The local engine, started for real: a sandbox of the host base runs ``true``."""
    from ..image import Image
    from .local import LocalBackend

    try:
        backend = LocalBackend(cache_dir)
    except SandboxError as exc:
        return [Check("local engine", False, str(exc))], None  # its message says what to do
    try:
        with backend.create(backend.build(Image.host())) as sb:
            res = sb.exec("true")
        if not res.ok:
            raise SandboxError(f"a command in a sandbox exited {res.exit_code}: {res.stderr.strip()[:200]}")
    except SandboxError as exc:
        backend.close()
        return [Check("local engine", False, str(exc))], None
    how = "as root, sandboxes in an unprivileged id range" if not backend.rootless else "rootless"
    checks = [
        Check("local engine", True, f"{how}; a sandbox started and ran a command (cache {backend.store.cache_dir})")
    ]
    return checks, backend


def _from_engine(backend: Any) -> list[Check]:
    """What the started engine found: cgroups, the network, live snapshots, disk images."""
    host = backend.host
    out = []
    cg = host.cgroups
    held = sorted(cg.controllers & {"memory", "pids", "cpu"})
    missing = sorted({"memory", "pids", "cpu"} - cg.controllers)
    if cg.usable and not missing:
        out.append(Check("cgroups", True, f"v{cg.version}: memory, pids and cpu limits held per sandbox"))
    elif cg.usable:
        out.append(
            Check(
                "cgroups",
                None,
                f"v{cg.version}: {', '.join(held) or 'no'} limits held per sandbox; {', '.join(missing)} NOT held "
                "(the controller is not available to our cgroups)",
                "enable the controllers for the cgroup pytest runs in (cgroup.subtree_control of its parent)",
            )
        )
    else:
        out.append(
            Check(
                "cgroups",
                None,
                f"not usable ({cg.reason}): pids and memory are held by rlimits, cpu is not held",
                "run pytest in a systemd user session, or under `systemd-run --user --scope pytest ...`"
                if backend.rootless
                else "",
            )
        )
    up = host.uplinks
    out.append(
        Check("network", True, "network=True gets a network of its own (slirp4netns), never the host's")
        if up.usable
        else Check("network", None, f"network=True cannot be given here: {up.reason}", _fix_in(up.reason))
    )
    criu = backend.engine.criu
    out.append(
        Check("live snapshots", True, f"CRIU {criu.version} works (snapshot(live=True))")
        if not criu.reason
        else Check("live snapshots", None, criu.reason)
    )
    disks = host.disks
    if backend.rootless:
        out.append(Check("disk limits", True, "rootless: a sandbox's disk is a tmpfs of its size"))
    elif disks.ext4:
        out.append(Check("disk limits", True, "an ext4 image on a loop device per sandbox with a disk limit"))
    else:
        out.append(Check("disk limits", None, f"not held: {disks.reason}", _fix_in(disks.reason)))
    return out


def _fix_in(reason: str) -> str:
    """The command a reason names in parentheses (``... (apt-get install x)``), if any."""
    start = reason.rfind("(apt")
    return reason[start + 1 : reason.find(")", start)] if start >= 0 and ")" in reason[start:] else ""


def _mmdebstrap() -> Check:
    path = shutil.which("mmdebstrap")
    if path:
        return Check("Debian bases", True, f"Image.debian() builds with {path}")
    return Check("Debian bases", None, "Image.debian() needs mmdebstrap", "apt-get install mmdebstrap")


def _docker() -> Check:
    try:
        import docker
    except ImportError:
        return Check(
            "docker backend", None, "the docker package is not installed", "pip install 'pytest-sandbox[docker]'"
        )
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=10)
        try:
            version = client.version().get("Version", "?")
        finally:
            client.close()
    except Exception as exc:  # the SDK raises many kinds (DockerException, requests' errors)
        return Check(
            "docker backend",
            None,
            f"no Docker engine answers at {where} ({type(exc).__name__})",
            "start dockerd, or set DOCKER_HOST to a running engine",
        )
    return Check("docker backend", True, f"Docker {version} at {where}")


def _daytona() -> Check:
    try:
        import daytona  # noqa: F401
    except ImportError:
        return Check(
            "daytona backend", None, "the daytona SDK is not installed", "pip install 'pytest-sandbox[daytona]'"
        )
    if os.environ.get("DAYTONA_API_KEY"):
        url = os.environ.get("DAYTONA_API_URL", "Daytona's default API")
        return Check("daytona backend", True, f"the SDK is installed; DAYTONA_API_KEY is set ({url})")
    return Check(
        "daytona backend",
        None,
        "the SDK is installed, and no DAYTONA_API_KEY is set",
        "set DAYTONA_API_KEY (and DAYTONA_API_URL), or serve one here: pytest-sandbox serve --daytona",
    )


def diagnose(cache_dir: str | None = None, *, say: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order; ``say`` gets each as soon as it is made."""
    out: list[Check] = []

    def add(checks: list[Check]) -> None:
        for c in checks:
            out.append(c)
            if say is not None:
                say(c)

    if not sys.platform.startswith("linux"):
        add(
            [Check("local engine", False, f"needs Linux (this is {sys.platform})", "use the docker or daytona backend")]
        )
    else:
        engine, backend = _engine(cache_dir)
        add(engine)
        add([_ids()])
        if backend is not None:
            try:
                add(_from_engine(backend))
            finally:
                backend.close()
    add([_mmdebstrap(), _docker(), _daytona()])
    return out
