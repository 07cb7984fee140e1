"""The example suite's environments. Copy this file to start your own.

`sandbox_image` is the default recipe: a base plus the example project copied in. On the local
engine the base is the host's system directories, read-only (no download, no Docker); a Docker
engine cannot share those, so there it is a Debian rootfs with python3 (built with mmdebstrap).
The setup key covers the *contents* of examples/project: edit a file there and the snapshot is
rebuilt once, then reused again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_sandbox import Backend, Image

HERE = Path(__file__).parent

# The example project has its own (deliberately failing) tests; they run inside sandboxes only.
collect_ignore = ["project"]


@pytest.fixture(scope="session")
def example_base(sandbox_backend: Backend) -> Image:
    """The base every example recipe starts from, chosen for the backend in use."""
    if sandbox_backend.name == "local":
        return Image.host()
    return Image.debian("bookworm", include=["python3"])


@pytest.fixture(scope="session")
def sandbox_image(example_base: Image) -> Image:
    return (
        example_base.copy(HERE / "project", "/work/project").env(PYTHONDONTWRITEBYTECODE="1").workdir("/work/project")
    )


@pytest.fixture(scope="session")
def sandbox_images(example_base: Image) -> dict[str, Image]:
    return {
        # A second environment that tests pick with @pytest.mark.sandbox(image="service").
        "service": example_base.run(
            "mkdir -p /srv/www && echo 'hello from the service image' > /srv/www/index.html"
        ).workdir("/srv/www"),
    }
