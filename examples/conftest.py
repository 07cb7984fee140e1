"""The example suite's environments. Copy this file to start your own.

`sandbox_image` is the default recipe: a base plus the example project copied in. On the local
engine the base is a registry image, `debian:bookworm-slim` (or PYTEST_SANDBOX_EXAMPLE_IMAGE) with
python3 installed by an apt step; when no registry can be reached (and none was asked for by name),
the examples say so and use the host's system directories instead. The docker and daytona backends
use a Debian rootfs with python3 built with mmdebstrap. The setup key covers the *contents* of
examples/project: edit a file there and the snapshot is rebuilt once, then reused again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from pytest_sandbox import Backend, Image, SnapshotBuildError

HERE = Path(__file__).parent
DEFAULT_IMAGE = "debian:bookworm-slim"

# The example project has its own (deliberately failing) tests; they run inside sandboxes only.
collect_ignore = ["project"]


@pytest.fixture(scope="session")
def example_base(sandbox_backend: Backend) -> Image:
    """The base every example recipe starts from, chosen for the backend in use."""
    if sandbox_backend.name != "local":
        return Image.debian("bookworm", include=["python3"])
    asked = os.environ.get("PYTEST_SANDBOX_EXAMPLE_IMAGE")
    image = Image.from_registry(asked or DEFAULT_IMAGE).apt_install("python3")
    try:
        sandbox_backend.build(image)
    except SnapshotBuildError as exc:
        if asked or "cannot reach the registry" not in str(exc):
            raise
        warnings.warn(
            f"the examples use the host base: {DEFAULT_IMAGE} is out of reach ({exc.reason})",
            stacklevel=1,
        )
        return Image.host()
    return image


@pytest.fixture(scope="session")
def sandbox_image(example_base: Image) -> Image:
    return (
        example_base.copy(HERE / "project", "/work/project").env(PYTHONDONTWRITEBYTECODE="1").workdir("/work/project")
    )


PG = "/usr/lib/postgresql/15/bin"
PG_DATA = "/var/lib/postgresql/15/main"


def postgres_image(base: Image) -> Image:
    """PostgreSQL 15 from Debian's packages as a service of the snapshot, with the shop's schema
    migrated by a build step that runs while the server is up. The server is shut down cleanly
    before the snapshot is frozen, so every test's fork starts it in tens of milliseconds.
    On the host base (no registry in reach) the Debian base is made with mmdebstrap instead."""
    if base.base_kind == "host":
        base = Image.debian("bookworm")
    return (
        base.apt_install("postgresql")
        .run("install -d -o postgres -g postgres /var/run/postgresql")
        .service(
            "postgres",
            start=f"exec runuser -u postgres -- {PG}/postgres -D {PG_DATA} "
            "-c config_file=/etc/postgresql/15/main/postgresql.conf -c ssl=off",
            ready=f"{PG}/pg_isready -q -h /var/run/postgresql",
            stop=f"runuser -u postgres -- {PG}/pg_ctl stop -m fast -w -D {PG_DATA}",
        )
        .copy(HERE / "shop" / "schema.sql", "/work/schema.sql")
        .run(
            "runuser -u postgres -- psql -q -v ON_ERROR_STOP=1"
            " -c \"CREATE ROLE shop LOGIN PASSWORD 'shop'\" -c 'CREATE DATABASE shop OWNER shop'"
            " && PGPASSWORD=shop psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U shop -d shop -f /work/schema.sql"
        )
    )


@pytest.fixture(scope="session")
def sandbox_images(example_base: Image) -> dict[str, Image]:
    return {
        # The integration examples' database (test_integration.py).
        "postgres": postgres_image(example_base),
        # A second environment that tests pick with @pytest.mark.sandbox(image="service").
        "service": example_base.run(
            "mkdir -p /srv/www && echo 'hello from the service image' > /srv/www/index.html"
        ).workdir("/srv/www"),
    }
