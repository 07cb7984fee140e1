"""A tiny application the integration examples test against a real PostgreSQL: it runs on the
host, and talks to the database in the test's sandbox through ``sandbox.expose``."""

from __future__ import annotations

from typing import Any


class UnknownCustomer(LookupError):
    """No customer of that name."""


def place_order(conn: Any, customer: str, item: str, qty: int) -> int:
    """Record an order and return its id."""
    row = conn.execute("SELECT id FROM customers WHERE name = %s", (customer,)).fetchone()
    if row is None:
        raise UnknownCustomer(customer)
    (order_id,) = conn.execute(
        "INSERT INTO orders (customer_id, item, qty) VALUES (%s, %s, %s) RETURNING id", (row[0], item, qty)
    ).fetchone()
    conn.commit()
    return int(order_id)


def items_of(conn: Any, customer: str) -> dict[str, int]:
    """How many of each item a customer ordered."""
    rows = conn.execute(
        "SELECT item, sum(qty) FROM orders JOIN customers c ON c.id = customer_id WHERE c.name = %s GROUP BY item",
        (customer,),
    ).fetchall()
    return {item: int(n) for item, n in rows}
