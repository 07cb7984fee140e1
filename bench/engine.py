"""Local engine benchmark: every figure side by side in one run, with ratios.

    python bench/engine.py [--n 50] [--cache DIR] [--json out.json] [--only exec]

Rows: fork + first exec vs the bare-bwrap floor (same layers) vs `docker run` (where a Docker
engine answers); exec round-trip; snapshot() of a 1 MB change on a small and a large base; disk
used by 1000 live sandboxes; fork at snapshot-chain depth 1 vs 200; a registry base pulled cold vs
reused warm (Debian's docker-registry on 127.0.0.1, skopeo); then the docker backend and the
daytona backend (through the SDK, against the local Daytona-compatible endpoint) on the same recipe,
each as a ratio to the local engine; cold forks with and without the default limits (issue 13);
exec beside a host subprocess and execs per second across 10 sandboxes (issue 27). `--only exec`
runs the fork and exec rows alone (a minute), e.g. as an unprivileged user for the rootless rows.
Targets (issue 2) are printed beside the measurements; nothing
here asserts, the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_sandbox import Backend, Image, Limits, Network, Snapshot
from pytest_sandbox.backends.local import LocalBackend
from pytest_sandbox.engine.cgroups import Cgroup
from pytest_sandbox.store import disk_usage

DEBIAN = Image.debian("bookworm", include=["python3", "python3-pip"])


FLOOD = """
import resource, sys, time
from pytest_sandbox.backends.local import LocalBackend
with LocalBackend(sys.argv[1]) as b:
    with b.create(b.get_snapshot(sys.argv[2])) as sb:
        sb.exec("true")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        r = sb.exec("head -c 3000000000 /dev/zero")
        secs = time.perf_counter() - t
        assert r.truncated
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, secs)
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ms(x: float) -> str:
    return f"{x * 1000:7.2f} ms"


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bare_bwrap(b: LocalBackend, snap: Snapshot, scratch: Path) -> Callable[[], None]:
    """The floor: one bwrap on the same layers running /bin/true, nothing else (launched the way
    the engine launches it: as root, as sandbox root from the helper's mount namespace)."""
    layers = [b.launch_path(b.store.layer_path(x)) for x in snap.layers]
    counter = [0]
    prefix = b.bwrap_launcher()

    def run() -> None:
        counter[0] += 1
        up, wk = scratch / f"u{counter[0]}", scratch / f"w{counter[0]}"
        up.mkdir()
        wk.mkdir()
        if b.ids is not None:
            os.chown(up, *b.ids.root)
            os.chown(wk, *b.ids.root)
        argv = list(prefix)
        for layer in layers:
            argv += ["--overlay-src", layer]
        argv += [
            "--overlay",
            b.launch_path(up),
            b.launch_path(wk),
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--new-session",
            "/bin/true",
        ]
        subprocess.run(argv, check=True)

    return run


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def docker_image(b: LocalBackend, snap: Snapshot) -> str:
    tag = f"pytest-sandbox-bench:{snap.short}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode != 0:
        src = b.store.layer_path(snap.layers[0])
        tar = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
    return tag


def remote_rows(
    label: str,
    remote: Backend,
    local: LocalBackend,
    deb: Snapshot,
    n: int,
    row: Callable[..., None],
    out: dict[str, float],
) -> None:
    """Another backend on the same recipe, each figure as a ratio to the local engine's."""
    t = time.perf_counter()
    rsnap = remote.build(DEBIAN)
    print(f"# {label}: Debian snapshot ready in {time.perf_counter() - t:.1f}s", flush=True)
    pairs: dict[str, tuple[list[float], list[float]]] = {"create": ([], []), "exec": ([], []), "snap": ([], [])}
    for _ in range(max(10, n // 2)):
        for backend, snap, side in ((local, deb, 0), (remote, rsnap, 1)):
            t = time.perf_counter()
            sb = backend.create(snap)
            sb.exec("true")
            pairs["create"][side].append(time.perf_counter() - t)
            pairs["exec"][side].append(timed(lambda sb=sb: sb.exec("true")))  # type: ignore[misc]
            sb.exec("head -c 1048576 /dev/urandom > /change.bin").check()
            t = time.perf_counter()
            s = sb.snapshot()
            pairs["snap"][side].append(time.perf_counter() - t)
            sb.close()
            backend.remove_snapshot(s)
    for what, key in (
        ("create + first exec", "create"),
        ("exec round trip", "exec"),
        ("snapshot() of a 1 MB change", "snap"),
    ):
        lo, rm = pct(pairs[key][0], 50), pct(pairs[key][1], 50)
        out[f"{label}_{key}_p50"] = rm
        row(f"{label}: {what}", f"p50 {ms(rm)}", f"local {ms(lo)}  {label}/local {rm / lo:.1f}x")


def docker_rows(local: LocalBackend, deb: Snapshot, n: int, row: Callable[..., None], out: dict[str, float]) -> None:
    from pytest_sandbox.backends.docker import DockerBackend

    with DockerBackend(local.store.cache_dir) as d:
        remote_rows("docker", d, local, deb, n, row, out)


def daytona_rows(local: LocalBackend, deb: Snapshot, n: int, row: Callable[..., None], out: dict[str, float]) -> None:
    """The daytona backend through the real SDK, against the local endpoint (HTTP on loopback,
    backed by the same engine): what the API round trips cost on top of the engine."""
    from pytest_sandbox.backends.daytona import DaytonaBackend

    argv = [sys.executable, "-m", "pytest_sandbox.cli", "--cache-dir", str(local.store.cache_dir), "serve"]
    argv += ["--daytona", "--port", "0", "--until-stdin-closes", "--api-key", "bench"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    url = proc.stdout.readline().strip().split("=", 1)[1]
    saved = {k: os.environ.get(k) for k in ("DAYTONA_API_URL", "DAYTONA_API_KEY")}
    os.environ.update(DAYTONA_API_URL=url, DAYTONA_API_KEY="bench")
    try:
        with DaytonaBackend(local.store.cache_dir) as d:
            remote_rows("daytona", d, local, deb, n, row, out)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        proc.stdin.close()
        proc.wait(timeout=60)


def registry_rows(local: LocalBackend, deb: Snapshot, n: int, row: Callable[..., None], out: dict[str, float]) -> None:
    """A registry base: cold pull-and-build (empty cache) vs warm reuse (tag resolved again, layers
    and snapshots cached) vs a pinned digest (no network at all). The image is the Debian layer of
    this bench, pushed with skopeo to Debian's docker-registry on 127.0.0.1."""
    work = Path(tempfile.mkdtemp(prefix="registry-", dir=local.store.root / "t"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {work}/data\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    reg = subprocess.Popen(
        ["docker-registry", "serve", str(work / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        tar = work / "rootfs.tar"
        subprocess.run(["tar", "-C", str(local.store.layer_path(deb.layers[0])), "-cf", str(tar), "."], check=True)
        ref = f"127.0.0.1:{port}/bench/debian:python3"
        time.sleep(0.5)  # the registry starts while tar runs; skopeo retries nothing
        subprocess.run(
            ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"tarball:{tar}", f"docker://{ref}"], check=True
        )
        recipe = Image.from_registry(ref).run("python3 -c 'print(1)' > /ok")
        cold, warm, pinned = [], [], []
        for _ in range(3):
            with LocalBackend(Path(tempfile.mkdtemp(prefix="cold-", dir=work))) as fresh:
                t = time.perf_counter()
                snap = fresh.build(recipe)
                cold.append(time.perf_counter() - t)
                digest = fresh.get_snapshot(snap.parent or "").base["image"].split("@")[1]
                for _ in range(max(10, n // 2)):
                    warm.append(timed(lambda fresh=fresh: fresh.build(recipe)))  # type: ignore[misc]
                    pin = Image.from_registry(f"127.0.0.1:{port}/bench/debian@{digest}").run(
                        "python3 -c 'print(1)' > /ok"
                    )
                    pinned.append(timed(lambda fresh=fresh, pin=pin: fresh.build(pin)))  # type: ignore[misc]
        mb = tar.stat().st_size >> 20
        c, w, p = pct(cold, 50), pct(warm, 50), pct(pinned, 50)
        out.update(registry_cold_p50=c, registry_warm_p50=w, registry_pinned_p50=p)
        row(f"registry base ({mb} MB): cold pull + build", f"p50 {ms(c)}", "empty cache: manifest, layer, unpack, step")
        row("registry base: warm reuse (tag resolved)", f"p50 {ms(w)}", f"cold/warm {c / w:.0f}x")
        row("registry base: warm reuse (pinned digest)", f"p50 {ms(p)}", f"cold/pinned {c / p:.0f}x, no network")
    finally:
        reg.kill()
        reg.wait()
        shutil.rmtree(work, ignore_errors=True)


def _outside_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.connect(("192.0.2.1", 9))  # no packet is sent: the address of the default route
        addr: str = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    return None


def network_rows(b: LocalBackend, deb: Snapshot, n: int, row: Callable[..., None], out: dict[str, float]) -> None:
    """create(network=True) + first exec against the same fork without network (both outside the
    warm pool), interleaved; and a 64 MB download from the host's own address (which a policy
    must allow) against the host downloading it itself."""
    uplinks = b.host.uplinks
    if not uplinks.usable:
        row("networked sandboxes", "skipped", uplinks.reason)
        return
    addr = _outside_address()
    served = Path(tempfile.mkdtemp(prefix="psb-net-"))
    (served / "blob").write_bytes(os.urandom(64 << 20))
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", addr or "127.0.0.1", "0", "--directory", str(served)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert server.stdout is not None
    port = server.stdout.readline().split(" port ")[1].split()[0]
    url = f"http://{addr}:{port}/blob"
    fetch = f"python3 -c 'import urllib.request; urllib.request.urlopen(\"{url}\").read()'"
    unpooled = Limits(pids=4095)  # other limits than the backend's: a fork of its own, as a networked one is
    times: dict[str, list[float]] = {"own": [], "none": [], "own_dl": [], "host_dl": []}
    try:
        for i in range(n):
            for side in ("own", "none"):
                t = time.perf_counter()
                policy = Network(allow=[addr]) if side == "own" and addr else side == "own"
                with b.create(deb, network=policy, limits=unpooled) as sb:
                    sb.exec("true")
                    times[side].append(time.perf_counter() - t)
                    if side == "own" and addr is not None and i < max(3, n // 10):
                        t = time.perf_counter()
                        sb.exec(fetch).check()
                        times["own_dl"].append(time.perf_counter() - t)
                        t = time.perf_counter()
                        urllib.request.urlopen(url).read()
                        times["host_dl"].append(time.perf_counter() - t)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(served, ignore_errors=True)
    own, none = pct(times["own"], 50), pct(times["none"], 50)
    out.update(network_own_p50=own, network_none_p50=none)
    row("create(network=True) + exec", f"p50 {ms(own)}", f"{own / none:.2f}x without network (slirp4netns, rules)")
    row("create() + exec, no network, no pool", f"p50 {ms(none)}", "")
    if times["own_dl"]:
        mbps = {k: 64 / pct(times[f"{k}_dl"], 50) for k in ("own", "host")}
        out.update(network_own_mbps=mbps["own"], network_host_mbps=mbps["host"])
        row(
            "64 MB over HTTP from the host's address",
            f"{mbps['own']:7.0f} MB/s",
            f"in a sandbox (allowed); the host itself {mbps['host']:.0f} MB/s ({mbps['own'] / mbps['host']:.2f}x)",
        )


def throughput_rows(b: LocalBackend, deb: Snapshot, n: int, row: Callable[..., None], out: dict[str, float]) -> None:
    """Execs per second across 10 sandboxes: from a pool of 10 threads, and from asyncio (aio)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from pytest_sandbox import aio

    total = max(500, n * 20)
    sbs = [b.create(deb) for _ in range(10)]
    try:
        for sb in sbs:
            sb.exec("true").check()
        with ThreadPoolExecutor(10) as pool:
            t = time.perf_counter()
            codes = list(pool.map(lambda i: sbs[i % 10].exec(["true"]).exit_code, range(total)))
            threads = total / (time.perf_counter() - t)
        assert codes == [0] * total

        async def gathered() -> float:
            async with aio.AsyncBackend(b, max_threads=10) as ab:  # leaves b open: it is ours
                boxes = [await ab.create(deb) for _ in range(10)]
                for box in boxes:
                    (await box.exec("true")).check()
                t = time.perf_counter()
                res = await asyncio.gather(*(boxes[i % 10].exec(["true"]) for i in range(total)))
                rate = total / (time.perf_counter() - t)
            assert all(r.exit_code == 0 for r in res)
            return rate

        asynced = asyncio.run(gathered())
    finally:
        for sb in sbs:
            sb.close()
    out.update(execs_per_second_threads=threads, execs_per_second_aio=asynced)
    row("execs per second, 10 sandboxes, 10 threads", f"{threads:8.0f} /s", f"{total} execs (target >= 1000/s)")
    row("execs per second, 10 sandboxes, aio", f"{asynced:8.0f} /s", f"{total} execs (target >= 1000/s)")


def more_rows(
    b: LocalBackend,
    deb: Snapshot,
    args: argparse.Namespace,
    row: Callable[..., None],
    out: dict[str, float],
    use_docker: bool,
) -> None:
    """Every row after the fork and exec ones: snapshots, a busy snapshot's pause, an output
    flood, live sandboxes' disk, chain depth, registry, docker and daytona."""
    # -- snapshot of a 1 MB change: small vs large base --------------------------------
    big = b.build(DEBIAN.run("mkdir /bulk && for i in $(seq 1 2000); do head -c 524288 /dev/urandom > /bulk/f$i; done"))
    for label, snap in (("small base (Debian, ~0.3 GB)", deb), ("large base (Debian + 1 GB)", big)):
        size = sum(disk_usage(b.store.layer_path(x)) for x in snap.layers) >> 20
        times = []
        for _ in range(max(10, args.n // 3)):
            with b.create(snap) as sb:
                sb.exec("head -c 1048576 /dev/urandom > /change.bin").check()
                t = time.perf_counter()
                s = sb.snapshot()
                times.append(time.perf_counter() - t)
            b.remove_snapshot(s)
        out[f"snapshot_1mb_{'large' if snap is big else 'small'}_p50"] = pct(times, 50)
        row(
            f"snapshot() of a 1 MB change, {label}",
            f"p50 {ms(pct(times, 50))}",
            f"p95 {ms(pct(times, 95))}  base {size} MB (target < 20 ms)",
        )

    # -- snapshot() of a busy sandbox: how long its processes are paused -----------------
    from pytest_sandbox.engine import pause as _pause

    pauses: list[float] = []
    real_paused = _pause.paused

    @contextlib.contextmanager
    def timed_pause(pid: int, cgroup: Cgroup | None = None, settle: float = 2.0) -> Iterator[int]:
        t = time.perf_counter()
        with real_paused(pid, cgroup, settle) as n:
            yield n
        pauses.append(time.perf_counter() - t)

    _pause.paused = timed_pause  # type: ignore[assignment]
    busy = []
    try:
        with b.create(deb) as sb:
            writer = "while :; do for i in 1 2 3 4 5 6 7 8; do echo x > /tmp/f$i; rm -f /tmp/f$i; done; done"
            sb.exec(f"for w in 1 2; do ( {writer} ) >/dev/null 2>&1 & done").check()
            sb.exec("head -c 1048576 /dev/urandom > /change.bin").check()
            for _ in range(max(10, args.n // 2)):
                t = time.perf_counter()
                s = sb.snapshot()
                busy.append(time.perf_counter() - t)
                b.remove_snapshot(s)
    finally:
        _pause.paused = real_paused
    out.update(busy_snapshot_p50=pct(busy, 50), busy_pause_p50=pct(pauses, 50), busy_pause_p95=pct(pauses, 95))
    row("snapshot() of a sandbox with 2 busy writers", f"p50 {ms(pct(busy, 50))}", f"p95 {ms(pct(busy, 95))}")
    row(
        "  of which its processes were paused",
        f"p50 {ms(pct(pauses, 50))}",
        f"p95 {ms(pct(pauses, 95))}  ({pct(pauses, 50) / pct(busy, 50):.0%} of the snapshot)",
    )

    # -- an output flood: the runner's memory stays bounded ----------------------------
    flood = subprocess.run(
        [sys.executable, "-c", FLOOD, str(b.store.cache_dir), deb.key],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        grew, secs = (float(x) for x in flood.stdout.split())
        out.update(flood_rss_growth_mb=grew, flood_seconds=secs)
        row("exec printing 3 GB: runner RSS growth", f"{grew:7.1f} MB", f"in {secs:.1f}s (16 MiB kept per stream)")
    except ValueError:
        row("exec printing 3 GB: runner RSS growth", "failed", flood.stderr.strip()[-200:])

    # -- 1000 live sandboxes -----------------------------------------------------------
    before = disk_usage(b.store.root / "r")
    live = []
    t = time.perf_counter()
    for _ in range(args.live):
        live.append(b.create(deb))
    elapsed = time.perf_counter() - t
    for sb in live[:: max(1, args.live // 10)]:
        sb.exec("true").check()
    used = disk_usage(b.store.root / "r") - before
    out["live_disk_mb"] = used / 2**20
    row(
        f"disk used by {args.live} live sandboxes",
        f"{used / 2**20:9.1f} MB",
        f"({used / args.live / 1024:.1f} KB each; created in {elapsed:.1f}s; target < 100 MB)",
    )
    for sb in live:
        sb.close()

    # -- chain depth ---------------------------------------------------------------------
    snap = deb
    chain = []
    for i in range(args.depth):
        with b.create(snap) as sb:
            sb.exec(f"echo {i} > /level").check()
            snap = sb.snapshot()
            chain.append(snap)
    d1, dn = chain[0], chain[-1]
    t1: list[float] = []
    tn: list[float] = []
    for _ in range(args.n):
        for s, acc in ((d1, t1), (dn, tn)):
            t = time.perf_counter()
            sb = b.create(s)
            sb.exec("true")
            acc.append(time.perf_counter() - t)
            sb.close()
    out.update(depth1_p50=pct(t1, 50), depthN_p50=pct(tn, 50))
    row("fork + exec at chain depth 1", f"p50 {ms(pct(t1, 50))}", f"{len(d1.layers)} layers")
    row(
        f"fork + exec at chain depth {args.depth}",
        f"p50 {ms(pct(tn, 50))}",
        f"{len(dn.layers)} layers (squashed)  ratio {pct(tn, 50) / pct(t1, 50):.2f}x (target <= 2x)",
    )
    for s in chain:
        b.remove_snapshot(s)
    if shutil.which("docker-registry") and shutil.which("skopeo"):
        registry_rows(b, deb, args.n, row, out)
    else:
        row("registry rows", "skipped", "(apt-get install docker-registry skopeo)")
    if use_docker:
        docker_rows(b, deb, args.n, row, out)
    if importlib.util.find_spec("daytona") is not None:
        daytona_rows(b, deb, args.n, row, out)
    else:
        row("daytona rows", "skipped", "(pip install 'pytest-sandbox[daytona]')")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50, help="samples per timing row")
    ap.add_argument("--cache", default=None, help="cache dir (default: a fresh temporary one)")
    ap.add_argument("--live", type=int, default=1000, help="live sandboxes for the disk row")
    ap.add_argument("--depth", type=int, default=200, help="snapshot chain depth")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument(
        "--only",
        choices=["exec"],
        help="exec: only the fork and exec rows (create + first exec and cold forks beside the bare-bwrap "
        "floor, exec beside a host subprocess, execs per second)",
    )
    args = ap.parse_args()
    cache = Path(args.cache or os.environ.get("PYTEST_SANDBOX_CACHE") or tempfile.mkdtemp(prefix="psb-bench-"))
    out: dict[str, float] = {}
    rows: list[str] = []

    def row(label: str, value: str, note: str = "") -> None:
        rows.append(f"{label:<46} {value:>22}  {note}")
        print(rows[-1], flush=True)

    with LocalBackend(cache) as b:
        print(f"# pytest-sandbox local engine bench  cache={cache}  rootless={b.rootless}  n={args.n}")
        t = time.perf_counter()
        deb = b.build(DEBIAN)
        base_mb = disk_usage(b.store.layer_path(deb.layers[0])) >> 20
        print(f"# Debian base ready in {time.perf_counter() - t:.1f}s ({base_mb} MB)")
        scratch = Path(tempfile.mkdtemp(prefix="floor-", dir=b.store.root / "r"))
        os.chmod(scratch, 0o755)

        # -- fork + first exec vs floor vs docker, interleaved so drift hits all alike --------
        floor = bare_bwrap(b, deb, scratch)
        use_docker = docker_available() and not args.only
        tag = docker_image(b, deb) if use_docker else ""
        eng, flo, dok = [], [], []
        for _ in range(args.n):
            flo.append(timed(floor))
            t = time.perf_counter()
            sb = b.create(deb)
            sb.exec("true")
            eng.append(time.perf_counter() - t)
            sb.close()
            if use_docker:
                dok.append(
                    timed(
                        lambda: subprocess.run(["docker", "run", "--rm", "--network", "none", tag, "true"], check=True)
                    )
                )
        shutil.rmtree(scratch, ignore_errors=True)
        out.update(
            fork_exec_p50=pct(eng, 50), fork_exec_p95=pct(eng, 95), floor_p50=pct(flo, 50), floor_p95=pct(flo, 95)
        )
        row("bare bwrap --overlay ... /bin/true (floor)", f"p50 {ms(pct(flo, 50))}", f"p95 {ms(pct(flo, 95))}")
        row(
            "engine: create() + first exec('true'), default limits on",
            f"p50 {ms(pct(eng, 50))}",
            f"p95 {ms(pct(eng, 95))}  ratio to floor {pct(eng, 50) / pct(flo, 50):.2f}x (target <= 1.5x)",
        )
        # The same without the warm pool: every create() starts its own bwrap.
        hot_after = b._pool.HOT_AFTER
        b._pool.HOT_AFTER = 1 << 30
        b._pool.close()
        b._pool._closed = False
        cold = []
        for _ in range(args.n):
            t = time.perf_counter()
            sb = b.create(deb)
            sb.exec("true")
            cold.append(time.perf_counter() - t)
            sb.close()
        # The same cold forks with no limits at all (no cgroup made, no rlimits), interleaved
        # with ones under the default limits: what a sandbox's cgroup costs.
        cgroups, limits = b.host.cgroups, b.limits
        bare: list[float] = []
        limited: list[float] = []
        for _ in range(args.n):
            for side, sink in ((0, bare), (1, limited)):
                if side == 0:
                    b.host.cgroups, b.limits = type(cgroups).__new__(type(cgroups)), Limits()
                    b.host.cgroups.version, b.host.cgroups.dirs, b.host.cgroups.reason = 0, {}, "bench"
                else:
                    b.host.cgroups, b.limits = cgroups, limits
                t = time.perf_counter()
                sb = b.create(deb, limits=None)
                sb.exec("true")
                sink.append(time.perf_counter() - t)
                sb.close()
        b.host.cgroups, b.limits = cgroups, limits
        b._pool.HOT_AFTER = hot_after
        out["cold_fork_exec_p50"] = pct(cold, 50)
        out["cold_no_limits_p50"], out["cold_default_limits_p50"] = pct(bare, 50), pct(limited, 50)
        row(
            "engine, warm pool off (a cold bwrap per fork)",
            f"p50 {ms(pct(cold, 50))}",
            f"p95 {ms(pct(cold, 95))}  ratio to floor {pct(cold, 50) / pct(flo, 50):.2f}x",
        )
        row(
            "  cold, no limits at all (no cgroup)",
            f"p50 {ms(pct(bare, 50))}",
            f"p95 {ms(pct(bare, 95))}  ratio to floor {pct(bare, 50) / pct(flo, 50):.2f}x",
        )
        row(
            f"  cold, default limits ({limits.describe()})",
            f"p50 {ms(pct(limited, 50))}",
            f"p95 {ms(pct(limited, 95))}  {pct(limited, 50) / pct(bare, 50):.2f}x the unlimited fork",
        )
        if not args.only:
            network_rows(b, deb, args.n, row, out)
        if use_docker:
            out["docker_run_p50"] = pct(dok, 50)
            row(
                "docker run --rm --network none IMAGE true",
                f"p50 {ms(pct(dok, 50))}",
                f"p95 {ms(pct(dok, 95))}  engine is {pct(dok, 50) / pct(eng, 50):.1f}x faster",
            )
        elif not args.only:
            row("docker run --rm --network none IMAGE true", "skipped", "(no Docker engine answers here)")

        # -- exec round trip ---------------------------------------------------------------
        with b.create(deb) as sb:
            sb.exec("true")
            ex: list[float] = []
            host: list[float] = []
            for _ in range(args.n * 2):  # interleaved: drift hits both alike
                ex.append(timed(lambda: sb.exec(["true"])))
                host.append(timed(lambda: subprocess.run(["true"])))
        out.update(exec_p50=pct(ex, 50), host_subprocess_p50=pct(host, 50))
        row("host subprocess.run(['true'])", f"p50 {ms(pct(host, 50))}", f"p95 {ms(pct(host, 95))}")
        row(
            "exec(['true']) round trip",
            f"p50 {ms(pct(ex, 50))}",
            f"p95 {ms(pct(ex, 95))}  ratio to the host's {pct(ex, 50) / pct(host, 50):.2f}x (target <= 2x)",
        )
        throughput_rows(b, deb, args.n, row, out)

        if not args.only:
            more_rows(b, deb, args, row, out, use_docker)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.cache and not os.environ.get("PYTEST_SANDBOX_CACHE"):
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
