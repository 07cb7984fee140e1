"""Plugin overhead per test, and xdist scaling, side by side in one run.

    python bench/plugin.py [--tests 200] [--repeat 3]

Writes two generated suites of N trivial tests: one where every test takes the `sandbox` fixture
(a fresh fork per test, plus one exec), one without sandboxes. Both run with -n 0 and -n 2 on a
warm snapshot cache. Overhead per test = (sandbox suite - plain suite) / N; target < 15 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SANDBOX_TEST = "def test_{i}(sandbox):\n    assert sandbox.exec('true').exit_code == 0\n"
TRIVIAL_SANDBOX_TEST = "def test_{i}(sandbox):\n    pass\n"
PLAIN_TEST = "def test_{i}():\n    pass\n"


def write_suite(root: Path, name: str, template: str, n: int) -> Path:
    d = root / name
    d.mkdir()
    (d / "test_suite.py").write_text("\n".join(template.format(i=i) for i in range(n)))
    return d


def run(suite: Path, cache: Path, workers: int) -> float:
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--sandbox-cache-dir={cache}",
        "-n",
        str(workers),
        str(suite),
    ]
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=suite)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{suite.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.tests
    root = Path(tempfile.mkdtemp(prefix="psb-plugin-bench-"))
    cache = Path(os.environ.get("PYTEST_SANDBOX_CACHE") or root / "cache")
    suites = {
        "plain": write_suite(root, "plain", PLAIN_TEST, n),
        "sandbox (fixture only)": write_suite(root, "trivial", TRIVIAL_SANDBOX_TEST, n),
        "sandbox + exec('true')": write_suite(root, "sandbox", SANDBOX_TEST, n),
    }
    run(suites["sandbox (fixture only)"], cache, 0)  # warm: build the snapshot once
    results: dict[tuple[str, int], list[float]] = {}
    for workers in (0, 2):
        for _ in range(args.repeat):  # interleaved so machine drift hits every suite alike
            for name, suite in suites.items():
                results.setdefault((name, workers), []).append(run(suite, cache, workers))
    print(f"# plugin bench: {n} tests per suite, median of {args.repeat} runs, warm cache, {os.cpu_count()} cores")
    med = {k: statistics.median(v) for k, v in results.items()}
    for workers in (0, 2):
        base = med[("plain", workers)]
        for name in suites:
            total = med[(name, workers)]
            extra = "" if name == "plain" else f"  overhead {(total - base) / n * 1000:6.2f} ms/test (target < 15)"
            print(f"-n {workers}  {name:<24} {total:7.2f} s{extra}")
    for name in suites:
        print(f"xdist scaling {name:<24} -n 2 vs -n 0: {med[(name, 0)] / med[(name, 2)]:.2f}x faster")


if __name__ == "__main__":
    main()
