"""The pytest-sandbox command: inspect and manage the snapshot cache of the local engine.

pytest-sandbox ls                 snapshots: key, size, age, parent, description
pytest-sandbox build MOD:ATTR     build the Image that MOD.ATTR names (or returns, if callable)
                                  (--push REPO: then push it; --cache-from REPO: pull what is there)
pytest-sandbox push KEY REPO      push a snapshot and its parents, tagged by key
pytest-sandbox pull REPO:KEY      pull a pushed snapshot into the cache, under its key
pytest-sandbox export KEY -o F    write a snapshot as an OCI image layout archive
pytest-sandbox import F           read such an archive into the cache
pytest-sandbox shell SNAPSHOT     an interactive shell in a fresh fork of SNAPSHOT
pytest-sandbox rm SNAPSHOT...     delete snapshots
pytest-sandbox prune [--older-than DAYS]   delete snapshots unused for that long (default: all)
pytest-sandbox gc                 remove what crashed processes left behind
pytest-sandbox serve              a Daytona-compatible API on localhost, backed by the local engine
                                  (or --backend docker)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence

from ._lifeline import on_eof
from .backends import BACKENDS
from .errors import ConfigError, SandboxError
from .image import Image
from .store import format_age, format_size
from .types import Backend, parse_size

__all__ = ["main"]


def _byte_count(text: str) -> int:
    """A size like ``1048576``, ``1024K`` or ``1M`` (the project's one size syntax), for argparse."""
    try:
        return parse_size(text, "--max-body")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    try:
        return _main(argv)
    except BrokenPipeError:  # `pytest-sandbox ls | head`: the reader left, nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="pytest-sandbox",
        description=__doc__.split("\n")[0],
        epilog="Exit status: 0 done, 1 an error (said on stderr, with what to do), 2 a usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--cache-dir", help="snapshot cache (default: $PYTEST_SANDBOX_CACHE or XDG cache)")
    parser.add_argument(
        "--backend",
        choices=("local", "docker", "daytona"),
        default="local",
        help="whose snapshots to manage (default: local)",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="list snapshots")
    ls.add_argument("--json", action="store_true", help="one JSON object per snapshot, one per line")
    b = sub.add_parser("build", help="build an Image named MODULE:ATTR")
    b.add_argument("spec")
    b.add_argument("--rebuild", action="store_true", help="ignore cached snapshots of its keys")
    b.add_argument("--push", metavar="REPO", help="push the snapshot (and its parents) to this registry repository")
    b.add_argument("--cache-from", metavar="REPO", help="pull the deepest step found in this repository first")
    b.add_argument("--json", action="store_true", help="print the snapshot as JSON (progress goes to stderr)")
    pu = sub.add_parser("push", help="push a snapshot and its parents to a registry, tagged by key")
    pu.add_argument("snapshot", help="key, key prefix or name")
    pu.add_argument("repository", help="e.g. registry.example/team/env (no tag: the keys are the tags)")
    pl = sub.add_parser("pull", help="pull a pushed snapshot (REPO:KEY, or REPO@sha256:... to pin it)")
    pl.add_argument("reference")
    ex = sub.add_parser("export", help="write a snapshot (and its parents) as an OCI image layout archive")
    ex.add_argument("snapshot", help="key, key prefix or name")
    ex.add_argument("-o", "--output", required=True, help="the archive to write (e.g. env.tar)")
    im = sub.add_parser("import", help="read an archive written by export into the cache")
    im.add_argument("archive")
    s = sub.add_parser("shell", help="interactive shell in a fresh fork of a snapshot")
    s.add_argument("snapshot")
    s.add_argument("--network", action="store_true", help="give the sandbox the host's network")
    s.add_argument("command", nargs=argparse.REMAINDER, help="run this instead of a shell (after --)")
    r = sub.add_parser("rm", help="delete snapshots")
    r.add_argument("snapshots", nargs="+")
    p = sub.add_parser("prune", help="delete snapshots unused for a while")
    p.add_argument("--older-than", type=float, default=0.0, metavar="DAYS")
    sub.add_parser("gc", help="remove leftovers of crashed processes")
    sub.add_parser("verify", help="check every layer of the cache in full; damaged ones get rebuilt")
    dr = sub.add_parser(
        "doctor",
        help="what works on this machine (engine, user namespaces, cgroups, network, CRIU, Docker, ...) and the fixes",
        description="Starts a sandbox of the host base for real, then reports each feature with its fix. "
        "Exit status 0 when the local engine works, 1 when it does not.",
    )
    dr.add_argument("--json", action="store_true", help='one JSON object: {"ok": ..., "checks": [...]}')
    sv = sub.add_parser("serve", help="serve an API on localhost, backed by the local engine or another backend")
    # The Daytona API is what it serves; the flag stays accepted so existing scripts keep working.
    sv.add_argument("--daytona", action="store_true", help=argparse.SUPPRESS)
    sv.add_argument(
        "--backend",
        choices=BACKENDS,
        # Unset unless given here, so `pytest-sandbox --backend docker serve` means the same.
        default=argparse.SUPPRESS,
        help="the backend whose sandboxes it serves (default: local)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=3986, help="port (default: 3986; 0 picks a free one)")
    sv.add_argument("--api-key", help="the bearer token clients must send (default: a random one, printed at start)")
    sv.add_argument("--target", action="append", help="the targets (regions) offered (default: local)")
    sv.add_argument("--rate-limit", type=float, metavar="PER_SECOND", help="answer 429 above this request rate")
    sv.add_argument(
        "--default-image",
        default="host",
        help="what sandboxes created without a snapshot start from: a snapshot key or name, "
        "or a base reference (host, debian:SUITE, a registry image)",
    )
    sv.add_argument("--until-stdin-closes", action="store_true", help="stop when standard input closes")
    sv.add_argument(
        "--max-body",
        type=_byte_count,
        default=64 << 20,
        metavar="BYTES",
        help="the largest request body accepted, e.g. 1M (default: 64M)",
    )
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "doctor":
        return _doctor(args)

    from .backends import open_backend

    try:
        with open_backend(args.backend, cache_dir=args.cache_dir) as backend:
            return _run(args, backend)
    except SandboxError as exc:
        print(f"pytest-sandbox: error: {exc}", file=sys.stderr)
        return 1


def _doctor(args: argparse.Namespace) -> int:
    from .backends import doctor

    checks = doctor.diagnose(args.cache_dir, say=None if args.json else lambda c: print(c.line(), flush=True))
    ok = any(c.name == "local engine" and c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [c.to_json() for c in checks]}))
    return 0 if ok else 1


def _run(args: argparse.Namespace, backend: Backend) -> int:
    if args.cmd == "ls":
        return _ls(backend, args.json)
    if args.cmd == "build":
        image = _load_image(args.spec)
        start = time.perf_counter()
        say = _progress if args.json else print
        snap = backend.build(image, on_log=say, rebuild=args.rebuild, cache_from=args.cache_from)
        say(f"snapshot {snap.key} ready in {time.perf_counter() - start:.1f}s")
        pushed = backend.push(snap, args.push, on_log=say) if args.push else None
        if args.json:
            print(json.dumps({**snap.to_json(), "pushed": pushed}))
        elif pushed:
            print(pushed)
        return 0
    if args.cmd == "push":
        print(backend.push(args.snapshot, args.repository, on_log=print))
        return 0
    if args.cmd == "pull":
        snap = backend.pull(args.reference, on_log=print)
        print(snap.key)
        return 0
    if args.cmd in ("export", "import"):
        name = "export" if args.cmd == "export" else "import_archive"
        method = getattr(backend, name, None)
        if method is None:
            where = f"not {backend.name}'s"
            print(f"pytest-sandbox: error: {args.cmd} works on the local engine's cache, {where}", file=sys.stderr)
            return 2
        if args.cmd == "export":
            method(args.snapshot, args.output, on_log=print)
        else:
            for snap in method(args.archive, on_log=print):
                print(snap.key)
        return 0
    if args.cmd == "shell":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return _shell(backend, args.snapshot, args.network, command or None)
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
    if args.cmd == "verify":
        verify = getattr(backend, "verify", None)
        if verify is None:
            print(
                f"pytest-sandbox: error: verify checks the local engine's layers, not {backend.name}'s", file=sys.stderr
            )
            return 2
        damaged = verify()
        for layer, keys in damaged.items():
            used = ", ".join(k[:12] for k in keys) or "no snapshot"
            print(f"damaged layer {layer} (used by {used}): marked absent, the next build rebuilds it")
        print(f"{'damaged layers found' if damaged else 'every layer is intact'}")
        return 1 if damaged else 0
    raise AssertionError(args.cmd)


def _version() -> str:
    try:
        return importlib.metadata.version("pytest-sandbox")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ls(backend: Backend, as_json: bool = False) -> int:
    snaps = list(backend.snapshots())
    if as_json:
        for snap in snaps:
            use = backend.usage(snap)
            print(json.dumps({**snap.to_json(), "size": use.size, "last_used": use.last_used}))
        return 0
    print(f"{'KEY':12}  {'OWN':>7}  {'AGE':>4}  {'USED':>4}  {'PARENT':12}  DESCRIPTION")
    now = time.time()
    for snap in snaps:
        use = backend.usage(snap)
        own = "-" if use.size is None else format_size(use.size)
        used = "-" if use.last_used is None else format_age(now - use.last_used)
        label = (f"[{snap.name}] " if snap.name else "") + snap.description
        print(
            f"{snap.short:12}  {own:>7}  {format_age(now - snap.created):>4}  {used:>4}  "
            f"{(snap.parent or '-')[:12]:12}  {label[:70]}"
        )
    print(f"{len(snaps)} snapshots, {backend.location()}")
    return 0


def _shell(backend: Backend, ref: str, network: bool, command: list[str] | None) -> int:
    snap = backend.get_snapshot(ref)
    term = {"TERM": os.environ.get("TERM", "xterm"), "PS1": f"sandbox:{snap.short}# "}
    with backend.create(snap, network=network) as sb:
        return sb.interactive(command, env=term)


def _serve(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from .backends import open_backend
    from .store import default_cache_dir

    try:
        from .server import DaytonaServer

        # Always a key: code in a networked sandbox reaches this port on loopback too.
        api_key = args.api_key or secrets.token_urlsafe(24)
        cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        with open_backend(args.backend, cache_dir=args.cache_dir) as backend:
            server = DaytonaServer(
                backend,
                cache_dir / "daytona-endpoint",
                host=args.host,
                port=args.port,
                api_key=api_key,
                targets=tuple(args.target or ("local",)),
                rate_limit=args.rate_limit,
                default_image=args.default_image,
                max_body=args.max_body,
            )
            # SIGTERM ends the server like Ctrl-C does: its sandboxes are deleted on the way out.
            # (Through shutdown(), not a KeyboardInterrupt raised into the event loop's tasks.)
            signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
            if args.until_stdin_closes:  # a parent's lifeline: EOF when it exits, even on kill -9
                # The bare fd, not sys.stdin: a thread blocked in a buffered read holds its lock,
                # and interpreter shutdown (after a plain SIGTERM) aborts on that lock.
                on_eof(0, lambda: os.kill(os.getpid(), signal.SIGTERM))
            print(f"DAYTONA_API_URL={server.api_url}\nDAYTONA_API_KEY={api_key}", flush=True)
            print(f"export DAYTONA_API_URL={server.api_url} DAYTONA_API_KEY={api_key}", file=sys.stderr)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.shutdown()
    except SandboxError as exc:
        print(f"pytest-sandbox: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pytest-sandbox: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
