"""The command line's conventions: --version, exit codes (1 errors, 2 usage), JSON output, and
`serve` without a flag it never needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
