"""Sharing benchmark (issue 15): push and pull of a ~250 MB snapshot (the Debian base with
python3) against ``skopeo copy`` of the same image, to and from the same kind of registry
(Debian's docker-registry on 127.0.0.1, a fresh one per measurement), side by side in one run.

    python bench/share.py [--runs 3] [--cache DIR]

Rows:
- push: ``backend.push()`` to an empty registry (it writes the layer tars and gzips them) vs
  ``skopeo copy oci:LAYOUT`` of our own export (its blobs are already gzipped: an upload only);
- pull: ``backend.pull()`` into an empty cache (download, verify, unpack into layers) vs
  ``skopeo copy`` to an OCI layout (download and verify only), and vs skopeo plus ``tar -xzf``
  of each layer (what a runnable tree costs that way);
- a child snapshot (one 5 MB step on top): its push sends one layer, its pull fetches one.

Nothing here asserts: the machine is shared and noisy. Needs skopeo and docker-registry.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pytest_sandbox import Image, Snapshot
from pytest_sandbox.backends.local import LocalBackend

DEBIAN = Image.debian("bookworm", include=["python3", "python3-pip"])
PLAIN = "push: skopeo copy of plain tars (it gzips)"


@contextlib.contextmanager
def registry(work: Path) -> Iterator[str]:
    """A fresh docker-registry on a free loopback port: its host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(tempfile.mkdtemp(dir=work, prefix="reg-"))
    (root / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", *args], check=True)


def untar_layers(layout: Path, key: str, dest: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    digest = next(
        m["digest"]
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == key
    )
    manifest = json.loads((layout / "blobs/sha256" / digest[7:]).read_text())
    for i, layer in enumerate(manifest["layers"]):
        d = dest / str(i)
        d.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(layout / "blobs/sha256" / layer["digest"][7:]), "-C", str(d)], check=True)


def uncompressed_layout(layout: Path, key: str, dest: Path) -> None:
    """A copy of ``layout``'s image ``key`` with plain tar layers: skopeo must gzip them itself
    when it pushes, which is the work our push does."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (dest / "oci-layout").write_text((layout / "oci-layout").read_text())
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == key)
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())
    config = manifest["config"]["digest"][7:]
    shutil.copy(layout / "blobs/sha256" / config, blobs / config)
    for layer in manifest["layers"]:
        with gzip.open(layout / "blobs/sha256" / layer["digest"][7:]) as src, (blobs / "tmp").open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        digest = hashlib.sha256((blobs / "tmp").read_bytes()).hexdigest()
        (blobs / "tmp").rename(blobs / digest)
        layer.update(
            mediaType="application/vnd.oci.image.layer.v1.tar",
            digest=f"sha256:{digest}",
            size=(blobs / digest).stat().st_size,
        )
    raw = json.dumps(manifest).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    entry.update(digest=f"sha256:{digest}", size=len(raw))
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


def one_run(
    run: int, a: LocalBackend, snap: Snapshot, child: Snapshot, work: Path, rows: dict[str, list[float]]
) -> None:
    """One paired measurement, each side against a fresh registry (order alternates by run)."""
    layout, plain = work / "layout", work / "plain"

    def add(row: str, secs: float) -> None:
        rows.setdefault(row, []).append(secs)

    with registry(work) as ours, registry(work) as theirs, registry(work) as plain_reg:
        add(
            PLAIN,
            timed(lambda: skopeo("--dest-tls-verify=false", f"oci:{plain}:{snap.key}", f"docker://{plain_reg}/env:x")),
        )
        sides = ["ours", "skopeo"] if run % 2 == 0 else ["skopeo", "ours"]
        for side in sides:
            if side == "ours":
                add("push: ours", timed(lambda: a.push(snap, f"{ours}/env")))
            else:
                src, dest = f"oci:{layout}:{snap.key}", f"docker://{theirs}/env:{snap.key}"
                add("push: skopeo copy", timed(skopeo, "--dest-tls-verify=false", src, dest))
        for side in sides:
            if side == "ours":
                pull_ours(run, a, snap, child, ours, work, add)
            else:
                out = work / f"skopeo{run}"
                src, dest = f"docker://{theirs}/env:{snap.key}", f"oci:{out}:{snap.key}"
                copy = timed(skopeo, "--src-tls-verify=false", src, dest)
                add("pull: skopeo copy (download, verify)", copy)
                add("pull: skopeo copy + tar -xzf", copy + timed(untar_layers, out, snap.key, work / f"t{run}"))


def pull_ours(
    run: int, a: LocalBackend, snap: Snapshot, child: Snapshot, reg: str, work: Path, add: Callable[[str, float], None]
) -> None:
    with LocalBackend(work / f"b{run}") as b:
        add("pull: ours (download, verify, unpack)", timed(lambda: b.pull(f"{reg}/env:{snap.key}")))
        # The child: its push sends one layer, its pull fetches one.
        pushed: list[str] = []
        add("child push (one new layer)", timed(lambda: a.push(child, f"{reg}/env", on_log=pushed.append)))
        pulled: list[str] = []
        add("child pull (one new layer)", timed(lambda: b.pull(f"{reg}/env:{child.key}", on_log=pulled.append)))
        if run == 0:
            fetched = sum(x.strip().startswith("layer ") for x in pulled)
            print(f"child push: {pushed[-1]}\nchild pull: {fetched} layer(s) fetched")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", help="the cache holding (or to hold) the Debian base")
    args = ap.parse_args()
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix="bench-share-"))
    rows: dict[str, list[float]] = {}
    try:
        with LocalBackend(args.cache or work / "a") as a:
            snap = a.build(DEBIAN)
            size = sum(f.stat().st_size for f in a.store.layer_path(snap.layers[0]).rglob("*") if f.is_file())
            child = a.build(DEBIAN.run("head -c 5000000 /dev/urandom > /srv/blob"))
            archive = a.export(snap, work / "export.tar")
            with tarfile.open(archive) as tf:
                tf.extractall(work / "layout", filter="data")
            uncompressed_layout(work / "layout", snap.key, work / "plain")
            print(f"snapshot {snap.short}: {size / 1e6:.0f} MB in {len(snap.layers)} layer(s)")
            for run in range(args.runs):
                one_run(run, a, snap, child, work, rows)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"\n{'row':44} {'p50':>9}  runs")
        for k, v in med.items():
            print(f"{k:44} {v:8.2f}s  {', '.join(f'{x:.2f}' for x in rows[k])}")
        pull = med["pull: ours (download, verify, unpack)"]
        print("\nratios (goal <= 1.3x):")
        for label, x in (
            ("push ours / skopeo copy (upload only)", med["push: ours"] / med["push: skopeo copy"]),
            (
                "push ours / skopeo copy of plain tars",
                med["push: ours"] / med["push: skopeo copy of plain tars (it gzips)"],
            ),
            ("pull ours / skopeo copy (no unpack)", pull / med["pull: skopeo copy (download, verify)"]),
            ("pull ours / skopeo copy + tar -xzf", pull / med["pull: skopeo copy + tar -xzf"]),
            ("child push / full push", med["child push (one new layer)"] / med["push: ours"]),
            ("child pull / full pull", med["child pull (one new layer)"] / pull),
        ):
            print(f"  {label:40} {x:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
