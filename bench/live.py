"""Live forks vs starting the same process from files, side by side in one run, with ratios.

    python bench/live.py [--n 20] [--warmup 2.0] [--cache DIR] [--json out.json]

The process: a Python server whose warm-up takes about ``--warmup`` seconds of CPU (it builds a
table of ~40 MB in memory and computes, as a model load or an index build would), then answers on
a unix socket. Rows:

* cold: create() of a snapshot of its files, start the process, wait for its first answer;
* live: create() of a live snapshot taken after the warm-up (CRIU restore), to its first answer;
* both for one copy at a time (p50 / p95) and for 3 at once (wall time of the three);
* the warm pool: create() of a hot live snapshot while spares are restored ahead (the wait);
* the checkpoint itself, and memory per copy (the sandbox's resident set).

Targets (issue 26, measured, not asserted): one live fork <= 250 ms p50, 3 at once <= 400 ms on
2 cores, the warm pool's wait under 20 ms. Root and CRIU 4.2 or newer only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pytest_sandbox import Image, Limits, Snapshot
from pytest_sandbox.backends.local import LocalBackend, LocalSandbox

DEBIAN = Image.debian("bookworm", include=["python3", "python3-pip"])

SERVER = """
import hashlib, os, socket, sys, time
t = time.process_time()
table = {i: str(i) * 3 for i in range(300000)}   # the state it builds, held in memory (~40 MB)
h = b""
while time.process_time() - t < float(sys.argv[1]):   # the rest of the warm-up: CPU, as a model load
    for _ in range(10000):
        h = hashlib.sha256(h).digest()
s = socket.socket(socket.AF_UNIX)
with __import__("contextlib").suppress(FileNotFoundError):
    os.unlink("/run/warm.sock")
s.bind("/run/warm.sock")
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(str(len(table)).encode())
    c.close()
"""
ASK = (
    "import socket, time\n"
    "while True:\n"
    "    try:\n"
    "        s = socket.socket(socket.AF_UNIX); s.connect('/run/warm.sock'); print(s.recv(100).decode()); break\n"
    "    except OSError:\n"
    "        time.sleep(0.005)\n"
)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def answer(sb: LocalSandbox) -> str:
    res = sb.exec(["python3", "-c", ASK], timeout=120)
    assert res.exit_code == 0, res.stderr
    return res.stdout.strip()


def rss_kib(sb: LocalSandbox) -> int:
    out = sb.exec("cat /proc/[0-9]*/status 2>/dev/null | awk '/^VmRSS/ {s += $2} END {print s}'").stdout
    return int(out.strip() or 0)


def at_once(n: int, one: Callable[[], LocalSandbox]) -> tuple[float, list[LocalSandbox]]:
    out: list[LocalSandbox] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(one())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise errors[0]
    return wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cache = args.cache or os.environ.get("PYTEST_SANDBOX_CACHE") or tempfile.mkdtemp(prefix="bench-live-")
    results: dict[str, float] = {}
    with LocalBackend(cache) as b:
        reason = b.engine.criu.reason
        if reason:
            sys.exit(f"bench/live.py: {reason}")
        base = b.build(DEBIAN)
        with b.create(base) as sb:
            sb.fs.write("/work/server.py", SERVER)
            files: Snapshot = sb.snapshot()
        start = f"python3 /work/server.py {args.warmup} >/dev/null 2>&1 &"
        # Limits of their own keep these out of the warm pool: each is a start or a restore then.
        unpooled = Limits(pids=4095)

        def cold() -> LocalSandbox:
            sb = b.create(files, limits=unpooled)
            sb.exec(start)
            answer(sb)
            return sb

        with b.create(files) as parent:
            parent.exec(start)
            expected = answer(parent)
            checkpoints = []
            for _ in range(5):
                t = time.perf_counter()
                live = parent.snapshot(live=True)
                checkpoints.append(time.perf_counter() - t)

        def restored() -> LocalSandbox:
            sb = b.create(live, limits=unpooled)
            assert answer(sb) == expected
            return sb

        def one_by_one(make: Callable[[], LocalSandbox], n: int) -> tuple[list[float], int]:
            times, mem = [], 0
            for _ in range(n):
                t = time.perf_counter()
                sb = make()
                times.append(time.perf_counter() - t)
                mem = rss_kib(sb)
                sb.close()
            return times, mem

        n_cold = max(3, args.n // 4)  # each costs the warm-up
        cold_times, cold_mem = one_by_one(cold, n_cold)
        live_times, live_mem = one_by_one(restored, args.n)
        cold3, sbs = at_once(3, cold)
        for sb in sbs:
            sb.close()
        live3s = []
        for _ in range(5):
            wall, sbs = at_once(3, restored)
            live3s.append(wall)
            for sb in sbs:
                sb.close()

    # The warm pool, in a backend of its own: a hot live snapshot's spares restored ahead.
    with LocalBackend(cache) as b:
        waits = []
        for _ in range(args.n):
            t = time.perf_counter()
            sb = b.create(live)
            waits.append(time.perf_counter() - t)
            assert answer(sb) == expected
            sb.close()
            time.sleep(0.4)  # a test's own work, while the pool restores the next spare

    def row(name: str, xs: list[float], target: str = "") -> None:
        results[f"{name} p50"] = pct(xs, 50)
        results[f"{name} p95"] = pct(xs, 95)
        print(f"{name:48s} p50 {pct(xs, 50) * 1000:8.1f} ms   p95 {pct(xs, 95) * 1000:8.1f} ms  {target}")

    print(f"live forks (warm-up {args.warmup:.1f} s of CPU, {os.cpu_count()} cores, CRIU)")
    row("checkpoint (snapshot(live=True))", checkpoints)
    row("cold: create + start + first answer", cold_times)
    row("live: create (restore) + first answer", live_times, "target <= 250 ms p50")
    row("cold, 3 at once (wall)", [cold3])
    row("live, 3 at once (wall)", live3s, "target <= 400 ms")
    row("live, warm pool: create()'s wait", waits[2:], "target < 20 ms")
    mem = f"cold {cold_mem / 1024:.1f} MiB, live {live_mem / 1024:.1f} MiB"
    print(f"{'memory per copy (resident, the sandbox)':48s} {mem}")
    print(
        f"ratios: cold/live one copy {pct(cold_times, 50) / pct(live_times, 50):.1f}x, "
        f"3 at once {cold3 / pct(live3s, 50):.1f}x"
    )
    results["memory cold KiB"] = cold_mem
    results["memory live KiB"] = live_mem
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
