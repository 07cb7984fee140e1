"""Programs the package runs as processes of their own, with ``python -c``.

Each is a file here, so that ruff and mypy check it like the rest of the package; the package
never imports them (their work runs only as ``__main__``). They use the standard library alone,
besides the SDK a remote backend's watchdog cleans up with: started through ``nsenter`` they run
on the base interpreter, in a mount namespace where the package's own path may not exist.

Core module: imports nothing of the package.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["source"]


@functools.cache
def source(name: str) -> str:
    """The text of the program ``name`` (``name.py`` here), to run with ``python -c``."""
    return (Path(__file__).parent / f"{name}.py").read_text()
