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

__all__ = ["freeze"]


def freeze(
    store: Store,
    scratch: Path,
    pid: int,
    cgroup: Cgroup | None,
    parent_layers: Sequence[str],
    needs_squash: Callable[[Sequence[str]], bool],
    record: Callable[[tuple[str, ...]], Snapshot],
) -> Snapshot:
    """The snapshot ``record`` makes of the layers a sandbox stands on now: ``parent_layers``
    plus what its writable layer (``scratch/u``, one directory per overlay) holds, squashed when
    the stack would be too deep for one mount. Stored before any gc can see its layer unused."""
    tmp = store.tmp_dir()
    try:
        changed = False
        with _pause.paused(pid, cgroup):
            for sub in sorted((scratch / "u").iterdir()):
                if any(sub.iterdir()):
                    dest = tmp / "layer" if sub.name == "root" else tmp / "layer" / sub.name
                    _layers.copy_tree(sub, dest)
                    changed = True
            if changed:  # the layer's top directory is the sandbox's /, whatever was copied
                _layers.copy_tree(scratch / "u" / "root", tmp / "layer", top_only=True)
        layers = list(parent_layers)
        with store.shared():
            if changed:
                layers.append(store.publish_layer(tmp / "layer"))
            if needs_squash(layers):
                _layers.squash([store.layer_path(x) for x in layers[1:]], tmp / "squash")
                layers = [layers[0], store.publish_layer(tmp / "squash")]
            snap = record(tuple(layers))
            store.put(snap)
        return snap
    finally:
        rmtree(tmp)
