"""The two seed ideas, run as tests: a tree search over real states, and a benchmark fixture
that scores candidate patches against one frozen repository."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pytest_sandbox import Backend, Image, aio

sys.path.insert(0, str(Path(__file__).parent))

import async_tree_search
import bench_fixture
import live_tree_search
import pytest
import tree_search


def test_tree_search_finds_the_target(sandbox_backend: Backend, example_base: Image) -> None:
    root = sandbox_backend.build(tree_search.start_image(example_base))
    result = tree_search.search(sandbox_backend, root, target=12, depth=4, beam=2)
    try:
        assert result.best_score == 0, result
        assert result.best_value == 12
        assert result.explored >= len(tree_search.ACTIONS)
        # Every explored state is a real snapshot that can be forked again.
        with sandbox_backend.create(result.snapshots[0]) as sb:
            assert sb.fs.read_text("/work/state").strip().lstrip("-").isdigit()
    finally:
        for snap in result.snapshots:
            sandbox_backend.remove_snapshot(snap)


def test_live_tree_search_continues_the_repl_in_every_branch(sandbox_backend: Backend, example_base: Image) -> None:
    """Each branch continues its parent's REPL process (its memory, not a replay of its history)."""
    reason = getattr(getattr(sandbox_backend, "engine", None), "criu", None)
    if sandbox_backend.name != "local" or reason is None or reason.reason:
        pytest.skip(
            "live snapshots need the local engine as root with CRIU 4.2: "
            + (reason.reason if reason is not None and reason.reason else f"this is the {sandbox_backend.name} backend")
        )
    root = sandbox_backend.build(live_tree_search.repl_image(example_base))
    assert root.live
    result = live_tree_search.search(sandbox_backend, root, target=12, depth=4, beam=2)
    try:
        assert result.best_value == 12, result
        # A branch's REPL is still the one process of the root: its pid there has not changed.
        with sandbox_backend.create(root) as a, sandbox_backend.create(result.snapshots[-1]) as b:
            pid = "import os; x = os.getpid()"
            assert live_tree_search.run(a, pid) == live_tree_search.run(b, pid)
    finally:
        for snap in result.snapshots:
            sandbox_backend.remove_snapshot(snap)


def test_async_tree_search_explores_branches_concurrently(sandbox_backend: Backend, example_base: Image) -> None:
    async def run() -> tuple[tree_search.Result, tree_search.Result]:
        async with aio.AsyncBackend(sandbox_backend) as backend:  # the fixture's backend stays open
            root = await backend.build(tree_search.start_image(example_base))
            found = await async_tree_search.search(backend, root, target=12, depth=4, beam=2)
        return found, tree_search.search(sandbox_backend, root, target=12, depth=4, beam=2)

    found, sync = asyncio.run(run())
    try:
        # The same states, found the same way: concurrency changes the order of work, not the result.
        assert (found.best_path, found.best_value, found.explored) == (sync.best_path, sync.best_value, sync.explored)
        assert found.best_score == 0
    finally:
        for snap in found.snapshots + sync.snapshots:
            sandbox_backend.remove_snapshot(snap)


def test_benchmark_fixture_scores_candidates(sandbox_backend: Backend, example_base: Image, tmp_path: Path) -> None:
    report = bench_fixture.run_benchmark(sandbox_backend, example_base)
    out = tmp_path / "results.json"
    out.write_text(json.dumps(report))
    by_name = {r["candidate"]: r for r in json.loads(out.read_text())["results"]}
    assert report["best"] == "swap-sign"
    assert by_name["swap-sign"]["passed"] == 3 and by_name["swap-sign"]["exit_code"] == 0
    assert by_name["no-change"]["passed"] == 1
    assert by_name["syntax-error"]["passed"] == 0 and by_name["syntax-error"]["exit_code"] != 0
