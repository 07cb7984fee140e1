"""The command line's conventions: --version, exit codes (1 errors, 2 usage), JSON output, and
`serve` without a flag it never needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pytest_sandbox.backends.local import LocalBackend

CLI = [sys.executable, "-m", "pytest_sandbox.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_version_usage_and_error_exit_codes(tmp_path: Path) -> None:
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("pytest-sandbox ")
    assert run("no-such-command").returncode == 2  # usage
    missing = run("--cache-dir", str(tmp_path), "rm", "nosuch")
    assert missing.returncode == 1 and "pytest-sandbox ls" in missing.stderr  # an error, saying what to do
    assert "``" not in run("--help").stdout  # plain text, no reST


def test_build_and_ls_speak_json(tmp_path: Path) -> None:
    (tmp_path / "recipe.py").write_text(
        "from pytest_sandbox import Image\nimage = Image.host().run('mkdir -p /work && echo j > /work/j')\n"
    )
    built = run("--cache-dir", str(tmp_path / "c"), "build", "recipe:image", "--json", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    snap = json.loads(built.stdout)  # progress went to stderr
    assert snap["description"].startswith("RUN mkdir") and "ready in" in built.stderr
    listed = run("--cache-dir", str(tmp_path / "c"), "ls", "--json")
    keys = [json.loads(line)["key"] for line in listed.stdout.splitlines()]
    assert snap["key"] in keys and all(isinstance(json.loads(x)["size"], int) for x in listed.stdout.splitlines())


def test_serve_needs_no_flag(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "--cache-dir", str(tmp_path), "serve", "--port", "0", "--api-key", "k", "--until-stdin-closes"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("DAYTONA_API_URL=http://127.0.0.1:")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=10)
        try:
            client.version()
        finally:
            client.close()
        return True
    except Exception:  # no SDK, no engine: either way the doctor must say it does not work
        return False


def test_doctor_reports_what_works_here_as_the_engine_found_it(backend: LocalBackend, tmp_path: Path) -> None:
    """Each line matches what the engine itself finds on this machine, as root and rootless."""
    res = run("--cache-dir", str(tmp_path / "c"), "doctor", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True and checks["local engine"]["ok"] is True
    assert ("rootless" in checks["local engine"]["detail"]) == backend.rootless
    assert ("rootless" in checks["user ids"]["detail"]) == backend.rootless
    cg = backend.host.cgroups
    assert checks["cgroups"]["ok"] is (True if cg.usable and {"memory", "pids", "cpu"} <= cg.controllers else None)
    up = backend.host.uplinks
    assert checks["network"]["ok"] is (True if up.usable else None)
    assert up.usable or up.reason in checks["network"]["detail"]  # the engine's reason, with its fix
    criu = backend.engine.criu.reason
    assert checks["live snapshots"]["ok"] is (None if criu else True) and criu in checks["live snapshots"]["detail"]
    assert checks["Debian bases"]["ok"] is (True if shutil.which("mmdebstrap") else None)
    assert checks["docker backend"]["ok"] is (True if _docker_answers() else None)
    assert checks["docker backend"]["ok"] or checks["docker backend"]["fix"]
    text = run("--cache-dir", str(tmp_path / "c"), "doctor")
    assert text.returncode == 0 and text.stdout.startswith("ok   local engine: "), text.stdout


def test_doctor_names_the_package_for_each_missing_tool(tmp_path: Path) -> None:
    """On a machine without mmdebstrap and slirp4netns (hidden from PATH, as CI's bare step does)."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for f in Path(d).glob("*") if Path(d).is_dir() else []:
            if f.name not in ("mmdebstrap", "slirp4netns") and not (bare / f.name).exists():
                (bare / f.name).symlink_to(f)
    env = {**os.environ, "PATH": str(bare), "DOCKER_HOST": "unix:///nonexistent"}
    res = subprocess.run(
        [*CLI, "--cache-dir", str(tmp_path / "c"), "doctor"], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Image.debian() needs mmdebstrap\n       fix: apt-get install mmdebstrap" in res.stdout
    assert "slirp4netns is not installed" in res.stdout and "fix: apt-get install slirp4netns" in res.stdout
    assert "--   docker backend: no Docker engine answers at unix:///nonexistent" in res.stdout


def test_doctor_fails_saying_why_where_the_engine_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # a cache directory that cannot be made: a real failure
    res = run("--cache-dir", str(tmp_path / "file" / "c"), "doctor")
    assert res.returncode == 1
    assert res.stdout.startswith("FAIL local engine: cannot use cache directory"), res.stdout
    assert "PYTEST_SANDBOX_CACHE" in res.stdout.splitlines()[0]  # what to do
    assert "Debian bases" in res.stdout and "docker backend" in res.stdout  # the rest is still checked
    as_json = json.loads(run("--cache-dir", str(tmp_path / "file" / "c"), "doctor", "--json").stdout)
    assert as_json["ok"] is False
