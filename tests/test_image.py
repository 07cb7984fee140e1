"""Unit tests of pure logic: recipes and setup keys (no engine involved)."""

from __future__ import annotations

import os
import pkgutil
import time
from pathlib import Path

import pytest

import pytest_sandbox
from pytest_sandbox import ConfigError, Image


def test_public_api_is_exactly_all() -> None:
    public = {n for n in dir(pytest_sandbox) if not n.startswith(("_", "@"))}
    public -= {m.name for m in pkgutil.iter_modules(pytest_sandbox.__path__)} | {"annotations"}
    assert public == set(pytest_sandbox.__all__)


def test_key_is_stable_and_hex() -> None:
    a = Image.debian("bookworm").apt_install("git").env(A="1").workdir("/w")
    b = Image.debian("bookworm").apt_install("git").env(A="1").workdir("/w")
    assert a.key == b.key
    assert len(a.key) == 64 and int(a.key, 16) >= 0


def test_key_known_value_pins_canonical_form() -> None:
    # A changed canonical form silently invalidates every user's cache: make it a visible decision.
    assert Image.host().run("true").key == Image.host().run("true").key
    assert Image.host().key != Image.debian().key
    assert Image.debian("bookworm").key != Image.debian("trixie").key
    assert Image.debian(include=["aa", "bb"]).key == Image.debian(include=["bb", "aa"]).key


def test_reordering_steps_changes_key() -> None:
    a = Image.host().run("echo 1").run("echo 2")
    b = Image.host().run("echo 2").run("echo 1")
    assert a.key != b.key


def test_env_and_workdir_are_in_key() -> None:
    assert Image.host().env(A="1").key != Image.host().env(A="2").key
    assert Image.host().workdir("/a").key != Image.host().workdir("/b").key


def test_copy_contents_not_mtime_change_key(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "f.txt").write_text("one")
    image = Image.host().copy(d, "/work/app")
    k1 = image.key
    later = time.time() + 100
    os.utime(d / "f.txt", (later, later))
    assert image.key == k1, "touching a copied file must not change the key"
    (d / "f.txt").write_text("two")
    assert image.key != k1, "editing a copied file must change the key"
    (d / "f.txt").write_text("one")
    assert image.key == k1
    (d / "new").write_text("x")
    assert image.key != k1


def test_copy_source_path_is_not_in_key(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("same")
    assert Image.host().copy(tmp_path / "a", "/x").key == Image.host().copy(tmp_path / "b", "/x").key


def test_prefix_keys_end_with_key() -> None:
    image = Image.host().run("a").run("b")
    keys = image.prefix_keys()
    assert len(keys) == 3 and keys[-1] == image.key and len(set(keys)) == 3


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Image.host().copy("/does/not/exist", "/x"), "does not exist"),
        (lambda: Image.host().copy("/etc/hostname", "relative/x"), "absolute sandbox path"),
        (lambda: Image.host().workdir("work"), "absolute sandbox path"),
        (lambda: Image.host().apt_install(), "at least one package"),
        (lambda: Image.host().run([]), "command string or a list"),
        (lambda: Image.debian(variant="tiny"), "unknown mmdebstrap variant"),
        (lambda: Image.from_rootfs("/nope"), "does not exist"),
        (lambda: Image.from_registry("bad ref"), "not valid"),
    ],
)
def test_bad_recipes_say_what_to_fix(make: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        make()  # type: ignore[operator]


def test_describe_lists_steps() -> None:
    text = Image.debian().apt_install("git").run(["echo", "a b"]).describe()
    assert text.splitlines() == ["FROM debian:bookworm (minbase)", "APT INSTALL git", "RUN echo 'a b'"]


@pytest.mark.parametrize(
    "ref",
    [
        "debian:--setup-hook=touch${IFS}x",  # an mmdebstrap option, not a suite
        "debian:bookworm --customize-hook=x",
        "debian:Bookworm",
        "-v",
        "python:3.12\n",
        "evil.example:99999/x",
        "evil.example#/x",
        "user@evil.example/x",
        "",
    ],
)
def test_one_strict_grammar_refuses_what_is_not_a_reference(ref: str) -> None:
    with pytest.raises(ConfigError):
        Image.from_ref(ref)


def test_a_client_names_no_path_or_host_of_the_machine() -> None:
    for ref in ("host", "/etc", "rootfs:/etc", "rootfs:relative"):
        with pytest.raises(ConfigError, match="names something of the endpoint's machine"):
            Image.from_ref(ref, host_paths=False)
    assert Image.from_ref("debian:trixie", host_paths=False).base.describe() == "debian:trixie (minbase)"
    assert Image.from_ref("127.0.0.1:5000/team/env:v1", host_paths=False).base_kind == "registry"


def test_debian_suites_and_packages_are_names() -> None:
    for suite in ("--setup-hook=x", "a b", "../x", "Stable", ""):
        with pytest.raises(ConfigError, match="suite"):
            Image.debian(suite)
    for package in ("--x", "/tmp/evil.deb", "a,b", "x"):
        with pytest.raises(ConfigError, match="package name"):
            Image.debian(include=[package])
    with pytest.raises(ConfigError, match="not the string"):
        Image.debian(include="python3")  # type: ignore[arg-type]
    assert Image.debian("bookworm-backports", include=["python3", "g++", "libc6.1"]).base.include == (
        "g++",
        "libc6.1",
        "python3",
    )


def test_mmdebstrap_gets_its_suite_and_path_after_the_end_of_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_sandbox import _build

    seen: list[list[str]] = []

    class Done:
        returncode = 0

    monkeypatch.setattr(_build.shutil, "which", lambda name: "/usr/bin/mmdebstrap")
    monkeypatch.setattr(_build._proc, "run", lambda argv, **kw: seen.append(list(argv)) or Done())
    base = Image.debian("bookworm", include=["python3"]).base
    _build.mmdebstrap_tar(base, "k" * 64, tmp_path / "-out.tar", 0, lambda _line: None)  # type: ignore[arg-type]
    argv = seen[0]
    assert argv[argv.index("--") + 1 :] == ["bookworm", str(tmp_path / "-out.tar")]
    assert all(a.startswith("--") for a in argv[1 : argv.index("--")])
