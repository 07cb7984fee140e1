"""The ``pytest-sandbox`` command: inspect and manage the snapshot cache of the local engine.

pytest-sandbox ls                 snapshots: key, size, age, parent, description
pytest-sandbox build MOD:ATTR     build the Image that MOD.ATTR names (or returns, if callable)
pytest-sandbox shell SNAPSHOT     an interactive shell in a fresh fork of SNAPSHOT
pytest-sandbox rm SNAPSHOT...     delete snapshots
pytest-sandbox prune [--older-than DAYS]   delete snapshots unused for that long (default: all)
pytest-sandbox gc                 remove what crashed processes left behind
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from .api import Backend
from .errors import ConfigError, SandboxError
from .image import Image
from .session import format_age as _age
from .store import disk_usage

__all__ = ["main"]


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _load_image(spec: str) -> Image:
    if ":" not in spec:
        raise ConfigError(f"expected MODULE:ATTR (e.g. conftest:image), got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        obj: object = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {spec}: {exc}") from exc
    if callable(obj) and not isinstance(obj, Image):
        obj = getattr(obj, "__wrapped__", obj)()  # a (fixture) function returning an Image
    if not isinstance(obj, Image):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a pytest_sandbox.Image")
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytest-sandbox`` command."""
    parser = argparse.ArgumentParser(prog="pytest-sandbox", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", help="snapshot cache (default: $PYTEST_SANDBOX_CACHE or XDG cache)")
    parser.add_argument(
        "--backend", choices=("local", "docker"), default="local", help="whose snapshots to manage (default: local)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="list snapshots")
    b = sub.add_parser("build", help="build an Image named MODULE:ATTR")
    b.add_argument("spec")
    b.add_argument("--rebuild", action="store_true", help="ignore cached snapshots of its keys")
    s = sub.add_parser("shell", help="interactive shell in a fresh fork of a snapshot")
    s.add_argument("snapshot")
    s.add_argument("--network", action="store_true", help="give the sandbox the host's network")
    s.add_argument("command", nargs="*", help="run this instead of a shell")
    r = sub.add_parser("rm", help="delete snapshots")
    r.add_argument("snapshots", nargs="+")
    p = sub.add_parser("prune", help="delete snapshots unused for a while")
    p.add_argument("--older-than", type=float, default=0.0, metavar="DAYS")
    sub.add_parser("gc", help="remove leftovers of crashed processes")
    args = parser.parse_args(argv)

    from .backends import open_backend

    try:
        with open_backend(args.backend, cache_dir=args.cache_dir) as backend:
            return _run(args, backend)
    except SandboxError as exc:
        print(f"pytest-sandbox: error: {exc}", file=sys.stderr)
        return 2


SHELL = ["/bin/sh", "-c", "exec bash -l 2>/dev/null || exec sh -l"]


def _run(args: argparse.Namespace, backend: Backend) -> int:
    if args.cmd == "ls":
        return _ls(backend)
    if args.cmd == "build":
        image = _load_image(args.spec)
        start = time.perf_counter()
        snap = backend.build(image, on_log=print, rebuild=args.rebuild)
        print(f"snapshot {snap.key} ready in {time.perf_counter() - start:.1f}s")
        return 0
    if args.cmd == "shell":
        return _shell(backend, args.snapshot, args.network, args.command or SHELL)
    if args.cmd == "rm":
        for ref in args.snapshots:
            backend.remove_snapshot(ref)
            print(f"removed {ref}")
        return 0
    if args.cmd == "prune":
        removed = backend.prune(args.older_than * 86400)
        print(f"removed {len(removed)} snapshots")
        return 0
    if args.cmd == "gc":
        print(f"removed {backend.gc()} leftovers")
        return 0
    raise AssertionError(args.cmd)


def _ls(backend: Backend) -> int:
    from .backends.local import LocalBackend

    store = backend.store if isinstance(backend, LocalBackend) else None
    snaps = list(backend.snapshots())
    print(f"{'KEY':12}  {'OWN':>7}  {'AGE':>4}  {'USED':>4}  {'PARENT':12}  DESCRIPTION")
    now = time.time()
    for snap in snaps:
        own = _size(disk_usage(store.layer_path(snap.layers[-1]))) if store and snap.layers else "-"
        used = _age(now - store.last_used(snap)) if store else "-"
        label = (f"[{snap.name}] " if snap.name else "") + snap.description
        print(
            f"{snap.short:12}  {own:>7}  {_age(now - snap.created):>4}  {used:>4}  "
            f"{(snap.parent or '-')[:12]:12}  {label[:70]}"
        )
    where = f"{_size(disk_usage(store.root / 'l'))} of layers in {store.cache_dir}" if store else "in the Docker engine"
    print(f"{len(snaps)} snapshots, {where}")
    return 0


def _shell(backend: Backend, ref: str, network: bool, command: list[str]) -> int:
    from .backends.local import LocalBackend

    snap = backend.get_snapshot(ref)
    term = {"TERM": os.environ.get("TERM", "xterm"), "PS1": f"sandbox:{snap.short}# "}
    if isinstance(backend, LocalBackend):
        with backend.create(snap, network=network) as sb:
            return subprocess.call(sb.nsenter_argv(command), env={**sb._env, **term})
    # docker: the CLI gives a real terminal; the container is removed when the shell exits
    argv = [
        "docker",
        "run",
        "--rm",
        "-it",
        "--network",
        "host" if network else "none",
        *(f"--env={k}={v}" for k, v in term.items()),
        f"{snap.base['image']}",
        *command,
    ]
    try:
        return subprocess.call(argv)
    except FileNotFoundError as exc:
        raise SandboxError("`pytest-sandbox --backend docker shell` needs the docker CLI on PATH") from exc


if __name__ == "__main__":
    sys.exit(main())
