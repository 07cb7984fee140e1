"""A reproducible benchmark fixture: a repository with failing tests frozen as one snapshot;
every candidate patch is applied in its own fork of that exact state, the tests run, and the
results are scored and written as JSON. Every candidate sees the same bytes, however many run.

    python examples/bench_fixture.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from pytest_sandbox import Backend, Image, Snapshot, open_backend

PROJECT = Path(__file__).parent / "project"

CANDIDATES: dict[str, str] = {
    "no-change": (PROJECT / "calc.py").read_text(),
    "swap-sign": (PROJECT / "calc.py").read_text().replace("return a - b  # the bug", "return a + b  # fixed", 1),
    "wrong-fix": (PROJECT / "calc.py").read_text().replace("return a - b  # the bug", "return abs(a) + abs(b)", 1),
    "syntax-error": "def add(a, b) return a + b\n",
}


def fixture_image(base: Image | None = None) -> Image:
    return (base or Image.host()).copy(PROJECT, "/work/project").workdir("/work/project")


def evaluate(backend: Backend, frozen: Snapshot, name: str, calc_source: str) -> dict[str, object]:
    """Apply one candidate in its own fork and score it by the tests that pass."""
    with backend.create(frozen) as sb:
        sb.fs.write("/work/project/calc.py", calc_source)
        run = sb.exec("python3 -m unittest -v 2>&1", cwd="/work/project/tests", env={"PYTHONPATH": ".."}, timeout=60)
    passed = len(re.findall(r" \.\.\. ok$", run.stdout, flags=re.M))
    total = len(re.findall(r"^test_\w+ ", run.stdout, flags=re.M)) or None
    return {
        "candidate": name,
        "exit_code": run.exit_code,
        "passed": passed,
        "total": total,
        "score": passed,
        "seconds": round(run.duration, 3),
    }


def run_benchmark(backend: Backend, base: Image | None = None) -> dict[str, object]:
    frozen = backend.build(fixture_image(base))
    start = time.perf_counter()
    results = [evaluate(backend, frozen, name, src) for name, src in CANDIDATES.items()]
    results.sort(key=lambda r: (-int(r["score"]), str(r["candidate"])))  # type: ignore[call-overload]
    return {
        "fixture": frozen.key,
        "results": results,
        "best": results[0]["candidate"],
        "seconds": round(time.perf_counter() - start, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results.json")
    args = ap.parse_args()
    with open_backend("local") as backend:
        report = run_benchmark(backend)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
