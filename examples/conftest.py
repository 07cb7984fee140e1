"""The example suite's environments. Copy this file to start your own.

`sandbox_image` is the default recipe: the host's system directories as a read-only base (no
download, no Docker), plus the example project copied in. Its setup key covers the *contents* of
examples/project: edit a file there and the snapshot is rebuilt once, then reused again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_sandbox import Image

HERE = Path(__file__).parent

# The example project has its own (deliberately failing) tests; they run inside sandboxes only.
collect_ignore = ["project"]


@pytest.fixture(scope="session")
def sandbox_image() -> Image:
    return (
        Image.host().copy(HERE / "project", "/work/project").env(PYTHONDONTWRITEBYTECODE="1").workdir("/work/project")
    )


@pytest.fixture(scope="session")
def sandbox_images() -> dict[str, Image]:
    return {
        # A second environment that tests pick with @pytest.mark.sandbox(image="service").
        "service": Image.host()
        .run("mkdir -p /srv/www && echo 'hello from the service image' > /srv/www/index.html")
        .workdir("/srv/www"),
    }
