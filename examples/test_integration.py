"""Integration tests against a real PostgreSQL, one fresh database server per test.

The recipe (``postgres_image`` in conftest.py) installs PostgreSQL, declares it as a service and
migrates the schema while it runs. Each test gets a copy-on-write fork with the server already up
and ready (the warm pool starts the next ones while tests run), and reaches it from the host
through ``sandbox.expose(5432)``. What one test writes, no other test sees.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_sandbox import Backend, Image, Sandbox

psycopg = pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (or '.[examples]')")

from shop.shop import UnknownCustomer, items_of, place_order  # noqa: E402

pytestmark = pytest.mark.sandbox(image="postgres")


@pytest.fixture(autouse=True)
def _needs_a_debian_base_as_root(sandbox_backend: Backend, example_base: Image) -> None:
    if sandbox_backend.name != "local":
        pytest.skip(f"recipe services run on the local engine; this run uses {sandbox_backend.name}")
    if example_base.base_kind == "host" and shutil.which("mmdebstrap") is None:
        pytest.skip("no registry in reach and no mmdebstrap for a Debian base: apt install mmdebstrap")
    if os.geteuid() != 0:
        pytest.skip("rootless sandboxes map one user id: PostgreSQL needs a user of its own (run as root)")


@pytest.fixture
def db(sandbox: Sandbox) -> Iterator[Any]:
    """A connection from the host to this test's own PostgreSQL."""
    host, port = sandbox.expose(5432)
    with psycopg.connect(host=host, port=port, user="shop", password="shop", dbname="shop") as conn:
        yield conn


def test_an_order_is_recorded(db: Any) -> None:
    place_order(db, "ada", "teapot", 2)
    place_order(db, "ada", "teapot", 1)
    assert items_of(db, "ada") == {"teapot": 3}


def test_every_test_starts_from_the_migrated_schema(db: Any) -> None:
    # Whatever the other tests wrote, in whatever order they ran: this fork has none of it.
    assert db.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert db.execute("SELECT name FROM customers ORDER BY id").fetchall() == [("ada",), ("grace",)]


def test_an_unknown_customer_is_refused(db: Any) -> None:
    with pytest.raises(UnknownCustomer):
        place_order(db, "nobody", "teapot", 1)


def test_the_schema_refuses_a_zero_quantity(db: Any) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        place_order(db, "grace", "kettle", 0)


@pytest.mark.parametrize("customer", ["ada", "grace"])
def test_orders_stay_with_their_customer(db: Any, customer: str) -> None:
    place_order(db, customer, "cup", 4)
    other = "grace" if customer == "ada" else "ada"
    assert items_of(db, customer) == {"cup": 4} and items_of(db, other) == {}


def test_the_server_runs_in_the_sandbox(sandbox: Sandbox) -> None:
    assert sandbox.services["postgres"].state == "ready"
    out = sandbox.exec("runuser -u postgres -- psql -tAc 'SELECT current_database()' shop").stdout
    assert out == "shop\n"
