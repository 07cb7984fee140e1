"""The async API on every backend: the same operations awaited, many execs at once from one event
loop, and cancellation that kills what the cancelled exec started (daytona: through AsyncDaytona,
against the local endpoint)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from pytest_sandbox import ExecTimeoutError, Image, SandboxClosedError, aio
from pytest_sandbox._offload import stoppable, unstoppable
from pytest_sandbox._proc import Cancel
from tests.conftest import Target, wait_for

T = TypeVar("T")
# The sleep processes of the tests' marker, found through /proc (images may lack ps): command
# lines that start with it, so neither the shells that started them nor the scan itself count.
COUNT = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$f 2>/dev/null; echo; done | grep -c '^sleep 99[9]'"


def host_processes(pattern: str) -> list[str]:
    """State and command line of every process on this machine whose command line matches."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if re.search(pattern, cmd) and state not in ("Z", "X"):
            found.append(f"{pid} {state} {cmd[:200]}")
    return found


def run(coro: Awaitable[T], timeout: float = 300) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def test_async_exec_files_fork_and_snapshot(debian_target: Target) -> None:
    async def go() -> None:
        async with (
            aio.AsyncBackend(debian_target.backend) as backend,
            await backend.create(debian_target.snapshot) as sb,
        ):
            res = await sb.exec(["sh", "-c", "cat; echo err >&2; exit 3"], input="in")
            assert (res.exit_code, res.stdout, res.stderr) == (3, "in", "err\n")
            assert (await sb.exec("pwd", cwd="/tmp")).stdout == "/tmp\n"
            await sb.fs.mkdir("/work/a")
            await sb.fs.write("/work/a/f.txt", "state")
            assert await sb.fs.listdir("/work/a") == ["f.txt"]
            assert await sb.fs.exists("/work/a/f.txt") and await sb.fs.is_dir("/work/a")
            assert (await sb.fs.stat("/work/a/f.txt")).st_size == 5
            child = await sb.fork()
            await sb.fs.write("/work/a/f.txt", "parent moved on")
            assert await child.fs.read_text("/work/a/f.txt") == "state"
            await child.close()
            with pytest.raises(SandboxClosedError):
                await child.exec("true")
            snap = await sb.snapshot()
            try:
                async with await backend.create(snap) as again:
                    assert await again.fs.read("/work/a/f.txt") == b"parent moved on"
                    with pytest.raises(ExecTimeoutError):
                        await again.exec("sleep 30", timeout=0.5)
                    assert (await again.exec("echo alive")).stdout == "alive\n"
            finally:
                await backend.remove_snapshot(snap)
        assert debian_target.backend.get_snapshot(debian_target.snapshot.key)  # the backend stays open

    run(go())


def test_fifty_execs_across_ten_sandboxes_run_at_once(debian_target: Target) -> None:
    """Every exec waits until all 50 are running (a barrier the test lifts when it sees them all),
    so the run can only finish if none waits for another. The barrier is a file with something in
    it: an upload may create the file before it writes its bytes."""

    async def go() -> None:
        async with aio.AsyncBackend(debian_target.backend) as backend:
            sbs = await asyncio.gather(*(backend.create(debian_target.snapshot) for _ in range(10)))
            wait = (
                "touch /tmp/started.$1; n=0; while [ ! -s /tmp/go ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done"
            )
            execs = [
                asyncio.ensure_future(sb.exec(["sh", "-c", f"{wait}; cat /tmp/go; echo $1", "sh", str(i)]))
                for sb in sbs
                for i in range(5)
            ]
            try:
                deadline = time.monotonic() + 120
                while True:
                    started = await asyncio.gather(*(sb.exec("ls /tmp | grep -c '^started'") for sb in sbs))
                    if all(r.stdout.strip() == "5" for r in started):
                        break
                    assert time.monotonic() < deadline, [r.stdout for r in started]
                    await asyncio.sleep(0.2)
                await asyncio.gather(*(sb.fs.write("/tmp/go", "go ") for sb in sbs))
                results = await asyncio.gather(*execs)
            finally:
                for e in execs:
                    e.cancel()
            assert sorted(r.stdout for r in results) == sorted(f"go {i}\n" for _ in sbs for i in range(5))

    run(go())


def test_cancelling_an_exec_kills_its_process_tree(debian_target: Target) -> None:
    tok = f"{secrets.randbelow(10**6):06d}"  # on the host, this test's processes are told by it

    async def go() -> None:
        async with (
            aio.AsyncBackend(debian_target.backend) as backend,
            await backend.create(debian_target.snapshot) as sb,
        ):
            await sb.exec(f"nohup sleep 9990.{tok} >/dev/null 2>&1 &")  # started earlier: must survive
            task = asyncio.ensure_future(
                sb.exec(f"sh -c 'sleep 9991.{tok} & sleep 9992.{tok} & wait' & sleep 9993.{tok}; echo end")
            )
            for _ in range(600):
                if (await sb.exec(COUNT)).stdout.strip() == "4":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the command's processes never all started")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Dead by the time the cancellation arrived, not some time later.
            left = (await sb.exec(COUNT.replace("99[9]", "999[1-3]"))).stdout.strip()
            assert left == "0"
            assert (await sb.exec(COUNT.replace("99[9]", "999[0]"))).stdout.strip() == "1"
            assert (await sb.exec("echo still usable")).stdout == "still usable\n"
            # Cancelled at once, before the command (or the wrapper around it) has started.
            for _ in range(3):
                task = asyncio.ensure_future(sb.exec(f"sleep 9994.{tok}"))
                await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert (await sb.exec(COUNT.replace("99[9]", "999[4]"))).stdout.strip() == "0"
            assert (await sb.exec(COUNT.replace("99[9]", "999[0]"))).stdout.strip() == "1"

    run(go())
    # Nothing it started is left anywhere: on the host no process of it is stopped or running (the
    # Daytona endpoint's nsenter once stopped itself when the command it ran was stopped).
    assert wait_for(lambda: not host_processes(f"sleep 999[1-4]\\.{tok}"), timeout=10), host_processes(
        f"sleep 999[1-4]\\.{tok}"
    )


# Forks as fast as it can (600 rounds: bounded, so it cannot crowd out other tests' sandboxes when
# the limit is a per-user rlimit), half of the children in sessions of their own (out of its
# process group), then waits.
LEFT = (
    "for f in /proc/[0-9]*; do c=$(tr '\\0' ' ' <$f/cmdline 2>/dev/null); "
    "case \"$c\" in 'sleep 777'*) echo \"$(cut -d' ' -f1-8 $f/stat) wchan=$(cat $f/wchan) | $c\" ;; esac; done"
)
BOMB = "i=0; while [ $i -lt 600 ]; do sleep 777.{tok} & setsid sleep 7770.{tok} & i=$((i + 1)); done; sleep 7771.{tok}"


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_command_forking_while_it_is_killed_leaves_nothing(debian_target: Target, how: str) -> None:
    """The tree is stopped before it is killed, so children forked during the kill, and ones that
    left the command's process group, die too."""
    bombs = COUNT.replace("99[9]", "77[7]")
    tok = f"{secrets.randbelow(10**6):06d}"
    bomb = BOMB.format(tok=tok)

    async def go() -> None:
        async with (
            aio.AsyncBackend(debian_target.backend) as backend,
            await backend.create(debian_target.snapshot) as sb,
        ):
            for _ in range(2):
                if how == "timeout":
                    with pytest.raises(ExecTimeoutError):
                        await sb.exec(bomb, timeout=0.5)
                else:
                    task = asyncio.ensure_future(sb.exec(bomb))
                    await asyncio.sleep(0.5)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                count = (await sb.exec(bombs)).stdout.strip()
                # What is left, if anything: "pid (comm) state ppid pgid sid ..." and its command line,
                # so that a failure in CI says how it got away.
                assert count == "0", (await sb.exec(LEFT)).stdout
            assert (await sb.exec("echo still usable")).stdout == "still usable\n"

    run(go())
    assert wait_for(lambda: not host_processes(f"sleep 777[01]?\\.{tok}"), timeout=10)


def test_open_backend_awaited_or_entered(tmp_path: Path) -> None:
    """Opening by name is the same code for every backend: the local one shows it."""

    async def go() -> None:
        backend = await aio.open_backend("local", cache_dir=tmp_path)
        try:
            snap = await backend.build(Image.host())
            async with await backend.create(snap) as sb:
                assert (await sb.exec("echo hi")).stdout == "hi\n"
        finally:
            await backend.close()
        with pytest.raises(SandboxClosedError):
            backend.sync.create(snap)
        async with aio.open_backend("local", cache_dir=tmp_path) as again:
            assert [s.key for s in await again.snapshots()] == [snap.key]

    run(go())


# -- the cancellation machinery, on its own --------------------------------------------------
def test_stoppable_passes_the_cancellation_on_only_once_the_call_returned() -> None:
    events: list[str] = []

    def call(cancel: Cancel) -> str:
        event = __import__("threading").Event()
        cancel.link(event)
        event.wait(30)
        events.append("returned")
        return "late"

    async def go() -> None:
        task = asyncio.ensure_future(stoppable(None, call))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        events.append("cancelled")

    run(go(), timeout=20)
    assert events == ["returned", "cancelled"]


def test_unstoppable_finishes_its_clean_up_through_repeated_cancels() -> None:
    done: list[str] = []

    async def clean_up() -> None:
        await asyncio.sleep(0.2)
        done.append("cleaned")

    async def go() -> None:
        task = asyncio.ensure_future(unstoppable(clean_up()))
        for _ in range(3):
            await asyncio.sleep(0.01)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done == ["cleaned"]

    run(go(), timeout=20)


def test_a_child_forked_after_the_pid_listing_is_still_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan lists the pids, then reads each one's state: a parent can finish a fork after the
    listing and stop before its state is read, so that scan sees it stopped and nobody new, while
    its child is not in the listing. Killing then would reparent the child out of reach (CI's
    rootless flake: one `setsid sleep` of a bomb left running below init). Only a second quiet scan
    ends the stopping. The race is made here on a process table of pure data: no signal reaches a
    real process."""
    from pytest_sandbox import _lifeline

    root, parent, child = 4_000_001, 4_000_002, 4_000_003
    listings = 0
    table: dict[int, tuple[str, int]] = {root: ("S", 1), parent: ("R", root)}
    sent: list[tuple[int, int]] = []

    def pids() -> list[int]:
        nonlocal listings
        listings += 1
        listed = list(table)
        if listings == 2:  # the fork completes after this listing, and the parent then stops
            table[child] = ("S", parent)
            table[parent] = ("T", root)
        return listed

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        if sig == _lifeline.signal.SIGSTOP and pid != parent:
            table[pid] = ("T", table[pid][1])
        if sig == _lifeline.signal.SIGKILL:
            table[pid] = ("Z", table[pid][1])

    monkeypatch.setattr(_lifeline, "pids", pids)
    monkeypatch.setattr(_lifeline, "read_stat", lambda pid: table.get(pid))
    monkeypatch.setattr(_lifeline.os, "kill", kill)
    monkeypatch.setattr(_lifeline.os, "killpg", lambda pgid, sig: None)
    _lifeline.kill_tree(root, budget=5)
    assert (child, _lifeline.signal.SIGSTOP) in sent
    assert (child, _lifeline.signal.SIGKILL) in sent


def test_the_in_sandbox_kill_catches_a_child_forked_after_its_pid_listing(tmp_path: Path) -> None:
    """The same race for the kill the docker and daytona backends run in the sandbox (sh, cat and
    awk over /proc): its glob lists the pids before cat reads their states. Here cat and kill are
    shell functions over a process table in files, with pids above any pid_max, so no signal can
    reach a real process."""
    from pytest_sandbox.backends._base import KILL_TREE_SH

    root, parent, child = 9_000_001, 9_000_002, 9_000_003
    d = tmp_path
    (d / "n").write_text("0")
    (d / "r").write_text("S")
    (d / "c").write_text("S")
    fake = (
        f"D={shlex.quote(str(d))}; "
        # Scan 1: the parent is in the middle of a fork; scan 2: it has stopped, its child is not
        # in the listing yet; from scan 3 on the child is there.
        "cat() { n=$(($(command cat $D/n) + 1)); echo $n >$D/n; "
        f'echo "{root} (sh) $(command cat $D/r) 1 x"; '
        f'if [ $n = 1 ]; then echo "{parent} (sh) R {root} x"; else echo "{parent} (sh) T {root} x"; fi; '
        f'if [ $n -ge 3 ]; then echo "{child} (sleep) $(command cat $D/c) {parent} x"; fi; }}; '
        'kill() { echo "$*" >>$D/kills; case "$*" in '
        f'"-STOP {root}") echo T >$D/r ;; "-STOP {child}") echo T >$D/c ;; esac; }}; '
    )
    subprocess.run(["/bin/sh", "-c", fake + KILL_TREE_SH, "sh", str(root)], check=True, timeout=60)
    kills = (d / "kills").read_text().splitlines()
    assert f"-STOP {child}" in kills, kills
    assert f"-KILL {child}" in kills, kills


def test_a_parent_waiting_in_vfork_counts_as_held(tmp_path: Path) -> None:
    """dash starts commands with vfork(): a parent whose vfork child was stopped before its exec
    waits in D state for good. The kill must see it as held (it forks no more), or it waits out its
    whole budget and kills with a fork possibly in flight, whose child then escapes (CI's flake:
    one `sleep` left after a kill). Here the parent is real: glibc's posix_spawn is a vfork, and
    its child blocks opening a FIFO nobody writes, before its exec."""
    from pytest_sandbox._lifeline import _held, kill_tree, read_stat

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = (
        "import os, sys; os.posix_spawn('/bin/true', ['true'], os.environ, "
        f"file_actions=[(os.POSIX_SPAWN_OPEN, 3, {str(fifo)!r}, os.O_RDONLY, 0)])"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        # D alone is not enough: the parent is in D briefly for other reasons too (loading pages
        # while it starts), so wait until it is in D inside kernel_clone, as the kill then sees it.
        assert wait_for(lambda: _held(parent.pid, (read_stat(parent.pid) or ("?", 0))[0]), timeout=30)
        assert (read_stat(parent.pid) or ("?", 0))[0] == "D"
        assert not _held(os.getpid(), "R")
        kill_tree(parent.pid, budget=60)
        assert parent.wait(timeout=10) == -9
    finally:
        parent.kill()
        parent.wait()
