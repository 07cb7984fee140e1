"""Build progress: each step's own duration, a "still running" line for slow steps, exact counts,
and pytest's verbosity (-q: the summary only; default: a line per snapshot; -v: every step)."""

from __future__ import annotations

import fnmatch
import secrets
import time
from pathlib import Path

import pytest

from pytest_sandbox.session import _Progress


def test_steps_get_their_own_duration_and_slow_ones_say_they_still_run() -> None:
    lines: list[str] = []
    p = _Progress("k" * 64, 3, lines.append, verbose=True, heartbeat=0.2)
    p.begin("[0/3] FROM base")
    time.sleep(0.55)
    p.begin("[2/3] RUN quick")
    p.begin("[3/3] RUN last")
    assert p.close() == "the base and 2 of 3 steps"
    still = [x for x in lines if "still running" in x]
    assert 2 <= len(still) <= 3 and all("[0/3] FROM base" in x for x in still), lines
    done = [x for x in lines if "still running" not in x]
    assert [x.split(" (")[0] for x in done] == [
        f"sandbox: {'k' * 12} {h}" for h in ("[0/3] FROM base", "[2/3] RUN quick", "[3/3] RUN last")
    ]
    assert float(done[0].rsplit("(", 1)[1].rstrip("s)")) >= 0.5  # its own time, not the build's so far
    assert float(done[1].rsplit("(", 1)[1].rstrip("s)")) < 0.2


def test_not_verbose_says_only_slow_steps() -> None:
    lines: list[str] = []
    p = _Progress("k" * 64, 1, lines.append, verbose=False, heartbeat=10)
    p.begin("[1/1] RUN x")
    assert p.close() == "1 of 1 step" and lines == []


CONFTEST = """
import pytest
from pytest_sandbox import Image

@pytest.fixture(scope="session")
def sandbox_image():
    return Image.host().run("echo {token} > /tok").run("echo two > /two")
"""


@pytest.mark.parametrize(
    ("flags", "shown", "hidden"),
    [
        ([], ["sandbox: snapshot * built in *s (*2 of 2 steps)", "sandbox: 1 snapshots built, *"], ["*[1/2] RUN*"]),
        (["-q"], ["sandbox: 1 snapshots built, *"], ["*snapshot * built in*", "*[1/2]*"]),
        (["-v"], ["sandbox: * [1/2] RUN echo * (*s)", "sandbox: * [2/2] RUN echo two > /two (*s)"], []),
        (["-n", "2"], ["sandbox: snapshot * built in *s (*2 of 2 steps)"], ["*[1/2] RUN*"]),
        (
            ["-n", "2", "-v"],
            ["sandbox: * [1/2] RUN echo * (*s)", "sandbox: snapshot * built in *s (*2 of 2 steps)"],
            [],
        ),
    ],
    ids=["default", "quiet", "verbose", "xdist", "xdist-verbose"],
)
def test_progress_follows_pytest_verbosity(
    pytester: pytest.Pytester, cache_dir: Path, flags: list[str], shown: list[str], hidden: list[str]
) -> None:
    pytester.makeconftest(CONFTEST.format(token=secrets.token_hex(6)))
    pytester.makepyfile(test_a="def test_one(sandbox):\n    assert sandbox.fs.read_text('/two') == 'two\\n'\n")
    result = pytester.runpytest_subprocess(f"--sandbox-cache-dir={cache_dir}", "-p", "no:cacheprovider", *flags)
    result.assert_outcomes(passed=1)
    # Through pytest's terminal reporter (the controller's, under xdist): on stdout, each line
    # whole and at its start (a pattern starts with "sandbox:", so one glued to dots fails).
    out = result.stdout.lines
    assert not [x for x in result.stderr.lines if "sandbox:" in x], result.stderr.lines

    def seen(pattern: str) -> bool:
        return any(fnmatch.fnmatch(x, pattern.replace("[", "[[]")) for x in out)  # [1/2] is no char class

    for pattern in shown:
        assert seen(pattern), (pattern, out)
    for pattern in hidden:
        assert not seen(pattern), (pattern, out)
