"""Recipes: a base plus ordered setup steps, and the setup key that names what they build.

An :class:`Image` is an immutable value: every builder method returns a new Image. Its
:attr:`Image.key` is a hex digest over a canonical form of the base, the steps (in order), the
environment and the *contents* of copied files, plus :data:`ENGINE_FORMAT`. It is the same on
every machine for the same inputs, so a snapshot built once is reused until the recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .refs import Reference

__all__ = [
    "ENGINE_FORMAT",
    "Base",
    "Service",
    "DebianBase",
    "HostBase",
    "Image",
    "RegistryBase",
    "RootfsBase",
    "Step",
    "check_argv",
    "env_items",
    "is_image_ref",
]

ENGINE_FORMAT = 1
"""Bumped when the on-disk snapshot format changes, so old snapshots are never reused wrongly."""

_HASH_CACHE: dict[tuple[int, int, int, int], str] = {}


def _file_digest(path: Path, st: os.stat_result) -> str:
    # Keyed by inode, size and mtime so an unchanged file is hashed once per process; the digest
    # itself is over contents only, so touching a file does not change the setup key.
    ck = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _HASH_CACHE.get(ck)
    if hit is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        hit = _HASH_CACHE[ck] = h.hexdigest()
    return hit


def content_digest(path: Path) -> str:
    """Digest of a file or directory tree: names, types, permission bits and contents, not times."""
    h = hashlib.sha256()

    def visit(p: Path, rel: str) -> None:
        st = p.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            h.update(f"L {rel} {os.readlink(p)}\n".encode())
        elif stat.S_ISDIR(st.st_mode):
            h.update(f"D {rel} {mode:o}\n".encode())
            for child in sorted(os.listdir(p)):
                visit(p / child, f"{rel}/{child}" if rel else child)
        elif stat.S_ISREG(st.st_mode):
            h.update(f"F {rel} {mode:o} {_file_digest(p, st)}\n".encode())
        else:
            h.update(f"S {rel} {stat.S_IFMT(st.st_mode):o}\n".encode())

    visit(path, "")
    return h.hexdigest()


@dataclass(frozen=True)
class Step:
    """One setup step of a recipe. ``kind`` is one of run, apt, pip, copy, env, workdir, service."""

    kind: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    source: Path | None = None
    mode: int | None = None

    def describe(self) -> str:
        """A one-line human form, used in logs and build errors."""
        if self.kind == "run":
            return "RUN " + (self.args[0] if len(self.args) == 1 else shlex.join(self.args))
        if self.kind == "apt":
            return "APT INSTALL " + " ".join(self.args)
        if self.kind == "pip":
            return "PIP INSTALL " + " ".join(self.args)
        if self.kind == "copy":
            return f"COPY {self.source} {self.args[0]}"
        if self.kind == "env":
            return "ENV " + " ".join(f"{k}={v}" for k, v in self.env)
        if self.kind == "service":
            return f"SERVICE {self.args[0]}: {self.args[1]}"
        return f"WORKDIR {self.args[0]}"

    def service(self) -> Service:
        """The :class:`Service` a ``service`` step declares."""
        name, start, ready, stop, timeout, grace, *live = self.args
        # ("live", WARM) follows for a live service: absent otherwise, so older keys stay as they were
        warm = live[1] if len(live) == 2 and live[0] == "live" else ""
        return Service(name, start, ready or None, stop or None, float(timeout), float(grace), bool(live), warm or None)

    def material(self) -> dict[str, Any]:
        """The canonical form hashed into the setup key (host paths and times left out)."""
        m: dict[str, Any] = {"kind": self.kind, "args": list(self.args)}
        if self.env:
            m["env"] = [list(p) for p in self.env]
        if self.kind == "copy":
            assert self.source is not None
            if not self.source.exists():
                raise ConfigError(
                    f"copy source {self.source} does not exist; fix the path in the recipe "
                    "(relative paths are resolved against the directory the Image was made in)"
                )
            m["content"] = content_digest(self.source)
            m["is_dir"] = self.source.is_dir()
            m["mode"] = self.mode
        return m


@dataclass(frozen=True)
class Service:
    """A server a snapshot runs: every sandbox of it starts ``start`` (in the background, output
    in the service's log) and is handed out once ``ready`` succeeds; ``stop`` ends it cleanly
    (default: SIGTERM to its process group, SIGKILL after ``grace`` seconds). Made by
    :meth:`Image.service <pytest_sandbox.Image.service>`."""

    name: str
    start: str
    ready: str | None = None
    stop: str | None = None
    timeout: float = 60.0
    grace: float = 10.0
    live: bool = False
    """Frozen running at build time (a live snapshot): forks continue it warm instead of starting it."""
    warm: str | None = None
    """Run once it is ready, before a live service is frozen (load caches, warm up a model)."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Service:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _check_abs(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{what} must be an absolute sandbox path like '/work', got {path!r}")
    return check_argv([path], what)[0]


def check_argv(argv: Sequence[str], what: str) -> list[str]:
    """``argv`` as a list, each argument a string without NUL: no process can be given one (the
    kernel ends an argument at it), so it is refused here rather than found mid-spawn."""
    out = list(argv)
    for arg in out:
        if not isinstance(arg, str):
            raise ConfigError(f"{what} takes strings, got {arg!r}")
        if "\0" in arg:
            raise ConfigError(f"{what}: {arg[:60]!r} holds a NUL byte, which no command line can carry; remove it")
    return out


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# What mmdebstrap is given as its positional suite, and in --include: names, never an option or a
# path (a suite of "--setup-hook=CMD" ran CMD on the host).
_SUITE = re.compile(r"[a-z0-9][a-z0-9.-]*\Z")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+\Z")  # Debian policy 5.6.1


def env_items(values: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``values`` as an environment: names a shell can export (letters, digits and ``_``, not
    starting with a digit: every backend sets them through one), values as strings without NUL."""
    items = []
    for k, v in values.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise ConfigError(
                f"environment variable name {k!r} is not valid: use letters, digits and underscores,"
                " not starting with a digit"
            )
        value = str(v)
        if "\0" in value:
            raise ConfigError(f"environment variable {k} holds a NUL byte, which no environment can carry")
        try:  # what os.environ gives for bytes that are not UTF-8 goes back to those bytes
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ConfigError(f"environment variable {k} holds text that is no bytes (a lone surrogate)") from None
        items.append((k, value))
    return tuple(items)


@dataclass(frozen=True)
class HostBase:
    """The host's system directories, shared read-only (:meth:`Image.host`)."""

    kind: ClassVar[str] = "host"

    def material(self) -> dict[str, Any]:
        return {"kind": "host"}

    def describe(self) -> str:
        return "host"


@dataclass(frozen=True)
class DebianBase:
    """A Debian root filesystem made with mmdebstrap (:meth:`Image.debian`)."""

    suite: str
    variant: str = "minbase"
    include: tuple[str, ...] = ()
    kind: ClassVar[str] = "debian"

    def material(self) -> dict[str, Any]:
        return {"kind": "debian", "suite": self.suite, "variant": self.variant, "include": list(self.include)}

    def describe(self) -> str:
        return f"debian:{self.suite} ({self.variant})"


@dataclass(frozen=True)
class RootfsBase:
    """A root filesystem from a host directory or tarball (:meth:`Image.from_rootfs`)."""

    path: Path
    kind: ClassVar[str] = "rootfs"

    def material(self) -> dict[str, Any]:
        # The rootfs' contents, not its host path, so the key is the same on every machine.
        return {"kind": "rootfs", "content": content_digest(self.path)}

    def describe(self) -> str:
        return f"rootfs {self.path}"


@dataclass(frozen=True)
class RegistryBase:
    """An OCI image from a registry (:meth:`Image.from_registry`); ``digest`` once pinned."""

    ref: str
    digest: str | None = None
    kind: ClassVar[str] = "registry"

    def material(self) -> dict[str, Any]:
        m: dict[str, Any] = {"kind": "registry", "ref": self.ref}
        if self.digest is not None:
            m["digest"] = self.digest
        return m

    def describe(self) -> str:
        return f"registry {self.ref}"


Base = HostBase | DebianBase | RootfsBase | RegistryBase
"""What a recipe starts from; ``base.kind`` names the variant."""


def _caller_relative(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against the directory of the file that called the method calling
    this (two frames up), or the current directory when that is no file (``<stdin>``, ``-c``)."""
    p = Path(path)
    if not p.is_absolute():
        caller = sys._getframe(2).f_code.co_filename
        if not caller.startswith("<") and os.path.isfile(caller):
            p = Path(caller).resolve().parent / p
    return p.resolve()


def is_image_ref(text: str) -> bool:
    """True when ``text`` reads as a base reference (see :meth:`Image.from_ref`) rather than a name."""
    return text in ("host", "debian") or ":" in text or "/" in text


@dataclass(frozen=True)
class Image:
    """A recipe: a base plus ordered setup steps. Build it with ``backend.build(image)``.

    Make one with :meth:`host`, :meth:`debian`, :meth:`from_rootfs` or :meth:`from_registry`,
    then chain steps; each call returns a new Image::

        Image.debian("bookworm").apt_install("git").copy("src", "/work/src").workdir("/work")
    """

    base: Base
    steps: tuple[Step, ...] = ()

    # -- bases -------------------------------------------------------------------------------
    @classmethod
    def host(cls) -> Image:
        """The host's system directories (/usr, /etc, /opt) as a read-only base, nothing copied.

        Home directories are never visible. Writes go to the sandbox's own layer.
        """
        return cls(base=HostBase())

    @classmethod
    def debian(cls, suite: str = "bookworm", *, variant: str = "minbase", include: Iterable[str] = ()) -> Image:
        """A Debian root filesystem built with ``mmdebstrap``, cached by its inputs.

        ``variant`` is mmdebstrap's (minbase, buildd, important, standard); ``include`` lists extra
        packages installed into the base itself.
        """
        if variant not in {
            "extract",
            "custom",
            "essential",
            "apt",
            "required",
            "minbase",
            "buildd",
            "important",
            "debootstrap",
            "standard",
        }:
            raise ConfigError(f"unknown mmdebstrap variant {variant!r}; use e.g. 'minbase'")
        if not isinstance(suite, str) or not _SUITE.match(suite):
            raise ConfigError(
                f"Debian suite {suite!r} is not valid: a suite is a name like 'bookworm' or 'stable' "
                "(lowercase letters, digits, '.' and '-', starting with a letter or digit)"
            )
        if isinstance(include, str):
            raise ConfigError(f"include= takes a list of package names, not the string {include!r}")
        packages = tuple(sorted(include))
        for name in packages:
            if not isinstance(name, str) or not _PACKAGE.match(name):
                raise ConfigError(
                    f"Debian package name {name!r} in include= is not valid: lowercase letters, digits, '+', '-' "
                    "and '.', starting with a letter or digit (install local .deb files with a copy() and a run() step)"
                )
        return cls(base=DebianBase(suite, variant, packages))

    @classmethod
    def from_rootfs(cls, path: str | os.PathLike[str]) -> Image:
        """A root filesystem from a directory or a ``.tar`` / ``.tar.gz`` / ``.tar.xz`` archive; a
        relative path is resolved as :meth:`copy` resolves one."""
        p = _caller_relative(path)
        if not p.exists():
            raise ConfigError(f"rootfs {p} does not exist; pass a directory or a tar archive")
        return cls(base=RootfsBase(p))

    @classmethod
    def from_registry(cls, ref: str) -> Image:
        """An OCI image from a container registry, e.g. ``"python:3.12-slim"``.

        Backends that cannot pull it yet raise a clear error when building.
        """
        Reference.parse(ref)  # the one grammar of registry references
        return cls(base=RegistryBase(ref))

    @classmethod
    def from_ref(cls, ref: str, *, host_paths: bool = True) -> Image:
        """A base as markers, options, the CLI and the Daytona endpoint name one, parsed by one
        strict grammar before anything runs::

            host                  the host's system directories
            debian[:SUITE]        Image.debian(SUITE), SUITE a name like bookworm ([a-z0-9][a-z0-9.-]*)
            rootfs:PATH | /PATH   Image.from_rootfs(PATH)
            anything else         a registry reference, [REGISTRY/]NAME[:TAG][@sha256:DIGEST]

        ``host_paths=False`` (what the Daytona-compatible endpoint passes for its clients' strings)
        refuses every form that names something of this machine: ``host``, ``rootfs:`` and paths.
        No form takes whitespace, control characters or a leading ``-`` (which a command would read
        as an option)."""
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"an image reference is a non-empty string, got {ref!r}")
        if ref.startswith("-") or any(ord(c) < 0x21 or c == "\x7f" for c in ref):
            raise ConfigError(
                f"image reference {ref!r} is not valid: it may not start with '-' or hold whitespace or control "
                "characters; use e.g. 'debian:bookworm' or 'python:3.12-slim'"
            )
        local = ref == "host" or ref.startswith(("rootfs:", "/"))
        if local and not host_paths:
            raise ConfigError(
                f"image reference {ref!r} names something of the endpoint's machine, which its clients may not use; "
                "use a registry reference (e.g. 'python:3.12-slim') or 'debian:SUITE'"
            )
        if ref == "host":
            return cls.host()
        if ref == "debian" or (ref.startswith("debian:") and "/" not in ref and "@" not in ref):
            return cls.debian(ref.partition(":")[2] or "bookworm")
        if ref.startswith("rootfs:"):
            return cls.from_rootfs(ref[len("rootfs:") :])
        if ref.startswith("/"):
            return cls.from_rootfs(ref)
        return cls.from_registry(ref)

    # -- steps -------------------------------------------------------------------------------
    def pinned(self, digest: str) -> Image:
        """This recipe with its registry base fixed at ``digest`` (what its tag resolved to): the
        digest is part of every key, so a moved tag gives new keys."""
        if not isinstance(self.base, RegistryBase):
            raise ConfigError("only registry bases are pinned to a digest")
        return Image(base=replace(self.base, digest=digest), steps=self.steps)

    def _add(self, step: Step) -> Image:
        return replace(self, steps=(*self.steps, step))

    def run(self, command: str | Sequence[str], *, env: Mapping[str, Any] | None = None) -> Image:
        """Run a shell command (a string) or an argv (a list) in the sandbox at build time."""
        args = (command,) if isinstance(command, str) else tuple(command)
        if not args or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"run() takes a command string or a list of strings, got {command!r}")
        check_argv(args, "run()")
        return self._add(Step("run", args, env=env_items(env or {})))

    def apt_install(self, *packages: str) -> Image:
        """Install Debian packages with apt-get (needs a Debian or Ubuntu base)."""
        if not packages:
            raise ConfigError("apt_install() needs at least one package name")
        return self._add(Step("apt", tuple(packages)))

    def pip_install(self, *packages: str) -> Image:
        """Install Python packages with ``python3 -m pip`` inside the sandbox."""
        if not packages:
            raise ConfigError("pip_install() needs at least one requirement")
        return self._add(Step("pip", tuple(packages)))

    def copy(self, source: str | os.PathLike[str], dest: str, *, mode: int | None = None) -> Image:
        """Copy a host file or directory into the sandbox. Its *contents* are part of the key.

        A relative ``source`` is resolved now against the directory of the file that calls
        ``copy()`` (your conftest.py, wherever pytest was started), or the current directory
        when there is no such file (an interactive session); an absolute one is taken as is.
        """
        _check_abs(dest, "copy() destination")
        src = _caller_relative(source)
        if not src.exists():
            raise ConfigError(f"copy() source {src} does not exist; fix the path")
        return self._add(Step("copy", (dest,), source=src, mode=mode))

    def service(
        self,
        name: str,
        *,
        start: str,
        ready: str | None = None,
        stop: str | None = None,
        timeout: float = 60.0,
        grace: float = 10.0,
        live: bool = False,
        warm: str | None = None,
    ) -> Image:
        """Declare a server every sandbox of this image runs, ready before the sandbox is handed out.

        ``start`` is a shell command run in the background (a daemon may fork away; a foreground
        server stays its child), its output kept in the service's log. ``ready`` is a shell
        command polled until it succeeds (up to ``timeout`` seconds, then a clear error with the
        log); without it the service counts as ready once it runs (its process has started).
        ``stop`` ends it cleanly before a snapshot is frozen (default: SIGTERM to its process
        group, SIGKILL after ``grace`` seconds), so forks never pay crash recovery. Later steps
        run with it up; several services start in recipe order.

        ``live=True`` freezes it running (the local engine as root, with CRIU 4.2: see the
        README's "Live snapshots"): the build starts it, waits for ``ready``, runs ``warm`` (a
        shell command that warms it up: loads caches, a model), and every sandbox restores it as
        it was then, warm, instead of starting it. Later steps of the recipe run with it up and
        are frozen live too; they have no network (a live sandbox has none yet), so put steps that
        download before it.
        """
        for what, value in (("name", name), ("start", start)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"service() needs a non-empty {what}, got {value!r}")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"service name {name!r} may hold only letters, digits, '-', '_' and '.'")
        if any(s.kind == "service" and s.args[0] == name for s in self.steps):
            raise ConfigError(f"the recipe already has a service named {name!r}; give each one its own name")
        for what, num in (("timeout", timeout), ("grace", grace)):
            if isinstance(num, bool) or not isinstance(num, (int, float)) or num <= 0:
                raise ConfigError(f"service {what} takes a positive number of seconds, got {num!r}")
        if warm is not None and (not live or not isinstance(warm, str) or not warm.strip()):
            raise ConfigError("service(warm=...) takes a non-empty shell command, and only with live=True")
        args: tuple[str, ...] = (name, start, ready or "", stop or "", str(float(timeout)), str(float(grace)))
        if live:
            args += ("live", warm or "")
        return self._add(Step("service", tuple(check_argv(args, "service()"))))

    def env(self, **values: Any) -> Image:
        """Set environment variables for later steps and for every command in the sandboxes."""
        if not values:
            raise ConfigError("env() needs at least one NAME=value")
        return self._add(Step("env", env=env_items(values)))

    def workdir(self, path: str) -> Image:
        """Set (and create) the directory later steps and sandbox commands start in."""
        return self._add(Step("workdir", (_check_abs(path, "workdir()"),)))

    # -- keys --------------------------------------------------------------------------------
    @property
    def base_kind(self) -> str:
        """``host``, ``debian``, ``rootfs`` or ``registry``."""
        return self.base.kind

    def base_material(self) -> dict[str, Any]:
        """The canonical form of the base hashed into keys."""
        return self.base.material()

    def prefix_keys(self) -> list[str]:
        """Keys of the base alone and of every prefix of the steps; the last is :attr:`key`."""
        h = hashlib.sha256()
        h.update(json.dumps({"format": ENGINE_FORMAT, "base": self.base_material()}, sort_keys=True).encode())
        keys = [h.copy().hexdigest()]
        for step in self.steps:
            h.update(b"\0" + json.dumps(step.material(), sort_keys=True).encode())
            keys.append(h.copy().hexdigest())
        return keys

    @property
    def key(self) -> str:
        """The setup key: stable across runs and machines, changed by any change to the recipe."""
        return self.prefix_keys()[-1]

    def describe(self) -> str:
        """The recipe in a readable form, one step a line."""
        head = "FROM " + self.base.describe()
        return "\n".join([head] + [s.describe() for s in self.steps])
