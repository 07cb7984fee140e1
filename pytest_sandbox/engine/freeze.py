"""Freezing a running sandbox's files: its writable layer copied out as a new immutable layer,
with every process of the sandbox stopped meanwhile (nothing can change, rename or swap what is
being copied), then published in the store with the record that uses it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..store import Store, rmtree
from ..types import Snapshot
from . import layers as _layers
from . import pause as _pause
from .cgroups import Cgroup

__all__ = ["copy_upper", "freeze", "publish"]


def copy_upper(scratch: Path, dest: Path) -> bool:
    """Copy a sandbox's writable layer (``scratch/u``, one directory per overlay) into ``dest``
    as one layer; whether it held anything. Its processes must be stopped meanwhile."""
    changed = False
    for sub in sorted((scratch / "u").iterdir()):
        if any(sub.iterdir()):
            _layers.copy_tree(sub, dest if sub.name == "root" else dest / sub.name)
            changed = True
    if changed:  # the layer's top directory is the sandbox's /, whatever was copied
        _layers.copy_tree(scratch / "u" / "root", dest, top_only=True)
    return changed


def publish(
    store: Store,
    tmp: Path,
    parent_layers: Sequence[str],
    needs_squash: Callable[[Sequence[str]], bool],
    record: Callable[[tuple[str, ...]], Snapshot],
) -> Snapshot:
    """The snapshot ``record`` makes of ``parent_layers`` plus ``tmp/layer`` (if there is one),
    squashed when the stack would be too deep for one mount: stored before any gc can see its
    layer unused."""
    layers = list(parent_layers)
    with store.shared():
        if (tmp / "layer").is_dir():
            layers.append(store.publish_layer(tmp / "layer"))
        if needs_squash(layers):
            _layers.squash([store.layer_path(x) for x in layers[1:]], tmp / "squash")
            layers = [layers[0], store.publish_layer(tmp / "squash")]
        snap = record(tuple(layers))
        store.put(snap)
    return snap


def freeze(
    store: Store,
    scratch: Path,
    pid: int,
    cgroup: Cgroup | None,
    parent_layers: Sequence[str],
    needs_squash: Callable[[Sequence[str]], bool],
    record: Callable[[tuple[str, ...]], Snapshot],
) -> Snapshot:
    """The snapshot ``record`` makes of the layers a sandbox (init ``pid``) stands on now."""
    tmp = store.tmp_dir()
    try:
        with _pause.paused(pid, cgroup):
            copy_upper(scratch, tmp / "layer")
        return publish(store, tmp, parent_layers, needs_squash, record)
    finally:
        rmtree(tmp)
