"""Services bench (issue 14): a PostgreSQL per test, side by side with pytest-postgresql.

    python bench/services.py [--n 40] [--body-ms 0 50] [--tables 20 500] [--cache DIR]

For each schema size (20 and 500 tables), in one run:

- sandbox, warm pool: what a test waits for (create the fork, ``expose(5432)``, connect from
  the host, first query), p50 and p95, with a test body of ``--body-ms`` between tests (the time
  the pool has to start the next server while the test runs; 0 = back to back);
- sandbox, cold: the same without the warm pool (the server starts while the test waits);
- pytest-postgresql's per-test database (its ``DatabaseJanitor`` creating the test's database
  from a template, connect, first query; dropped after), against one host server;
- throughput on this machine: tests per second, two threads back to back, for both.

pytest-postgresql and psycopg come from the package index (``pip install pytest-postgresql
'psycopg[binary]'``); PostgreSQL itself from Debian's packages (``apt install postgresql``). The
sandbox side needs mmdebstrap (a Debian base). Run as root: PostgreSQL needs a user of its own,
which rootless sandboxes do not have. Nothing here asserts; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pytest_sandbox import Image, Snapshot
from pytest_sandbox.backends.local import LocalBackend

PG = "/usr/lib/postgresql/15/bin"
PG_DATA = "/var/lib/postgresql/15/main"


def schema(tables: int) -> str:
    return "\n".join(
        f"CREATE TABLE t{i} (id serial PRIMARY KEY, a int NOT NULL, b text, c timestamptz DEFAULT now());"
        f" CREATE INDEX t{i}_a ON t{i} (a);"
        for i in range(tables)
    )


# The ready check reads the catalogs once: a fork's first query then finds them in shared
# buffers (5 ms instead of 25), and the warm pool pays it while tests run.
WARM = "SELECT count(*) FROM pg_class, pg_attribute WHERE attrelid = pg_class.oid"


def recipe(sql: Path) -> Image:
    """PostgreSQL set up the way a test suite wants it: trust on loopback and no TLS (as
    pytest-postgresql's server is: TLS alone costs ~8 ms a connection), and a warming ready check."""
    return (
        Image.debian("bookworm", include=["postgresql"])
        .run("install -d -o postgres -g postgres /var/run/postgresql")
        .run("sed -i 's/scram-sha-256$/trust/' /etc/postgresql/15/main/pg_hba.conf")
        .service(
            "postgres",
            start=f"exec runuser -u postgres -- {PG}/postgres -D {PG_DATA} "
            "-c config_file=/etc/postgresql/15/main/postgresql.conf -c ssl=off",
            ready=f"{PG}/psql -qAt -h 127.0.0.1 -U postgres -c '{WARM}' postgres >/dev/null",
            stop=f"runuser -u postgres -- {PG}/pg_ctl stop -m fast -w -D {PG_DATA}",
        )
        .copy(sql, "/work/schema.sql")
        .run(f"{PG}/psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -f /work/schema.sql postgres")
    )


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ms(x: float) -> str:
    return f"{x * 1000:7.1f} ms"


FIXTURE: list[float] = []  # the sandbox fixture's own wait of each test (create + expose)


def sandbox_test(b: LocalBackend, snap: Snapshot, psycopg: Any) -> tuple[float, Callable[[], None]]:
    """One test's wait until its first query answered (recording the fixture's part), and the
    clean-up after its body."""
    t = time.perf_counter()
    sb = b.create(snap)
    host, port = sb.expose(5432)
    FIXTURE.append(time.perf_counter() - t)
    conn = psycopg.connect(host=host, port=port, user="postgres", dbname="postgres")
    conn.execute("SELECT count(*) FROM t0").fetchone()
    wait = time.perf_counter() - t

    def done() -> None:
        conn.close()
        sb.close()

    return wait, done


@contextlib.contextmanager
def host_server(tables: int, sql: Path) -> Iterator[tuple[int, str]]:
    """A PostgreSQL on the host (as the postgres user: it refuses root) with a template database
    holding the schema, the way a pytest-postgresql run prepares it."""
    from pytest_postgresql.janitor import DatabaseJanitor

    work = Path(tempfile.mkdtemp(prefix="pgbench-"))
    os.chmod(work, 0o777)
    data = work / "data"
    port = 25432 + tables % 1000
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, f"{PG}/initdb", "-A", "trust", "-U", "postgres", "-D", str(data)], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(
        [*as_pg, f"{PG}/pg_ctl", "start", "-w", "-D", str(data), "-l", str(work / "log"),
         "-o", f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        tmpl = DatabaseJanitor(
            user="postgres", host="127.0.0.1", port=port, version=15, dbname="tmpl", as_template=True
        )
        tmpl.init()
        with tmpl.cursor("tmpl") as cur:
            cur.execute(sql.read_text())
        yield port, "tmpl"
    finally:
        subprocess.run([*as_pg, f"{PG}/pg_ctl", "stop", "-m", "immediate", "-D", str(data)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def janitor_test(port: int, template: str, i: int, psycopg: Any) -> tuple[float, Callable[[], None]]:
    from pytest_postgresql.janitor import DatabaseJanitor

    t = time.perf_counter()
    name = f"test_{threading.get_ident() % 100000}_{i}"
    j = DatabaseJanitor(user="postgres", host="127.0.0.1", port=port, version=15, dbname=name, template_dbname=template)
    j.init()
    conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=name)
    conn.execute("SELECT count(*) FROM t0").fetchone()
    wait = time.perf_counter() - t

    def done() -> None:
        conn.close()
        j.drop()

    return wait, done


def settle(b: LocalBackend) -> None:
    """Wait until the warm pool starts nothing more: the next row should not share the CPU with it."""
    while any(b._pool._filling.values()):
        time.sleep(0.05)


def series(one: Callable[[int], tuple[float, Callable[[], None]]], n: int, body: float) -> list[float]:
    waits = []
    for i in range(n):
        wait, done = one(i)
        waits.append(wait)
        time.sleep(body)
        done()
    return waits


def throughput(one: Callable[[int], tuple[float, Callable[[], None]]], seconds: float) -> float:
    count = [0, 0]
    end = time.monotonic() + seconds

    def worker(k: int) -> None:
        i = 0
        while time.monotonic() < end:
            _, done = one(k * 100000 + i)
            done()
            i += 1
        count[k] = i

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--body-ms", type=float, nargs="+", default=[0.0, 50.0])
    ap.add_argument("--tables", type=int, nargs="+", default=[20, 500])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each throughput run")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    try:
        import psycopg
    except ImportError:
        sys.exit("pip install 'psycopg[binary]' pytest-postgresql")
    have_janitor = shutil.which("runuser") is not None and Path(PG, "initdb").exists()
    try:
        import pytest_postgresql  # noqa: F401
    except ImportError:
        have_janitor = False
        print("# pytest-postgresql not installed: its rows are skipped (pip install pytest-postgresql)")
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL needs a user of its own, which rootless sandboxes do not have")

    cache = args.cache or tempfile.mkdtemp(prefix="svcbench-")
    rows: list[str] = []

    def row(label: str, value: str, note: str = "") -> None:
        rows.append(f"{label:<62} {value:>26}  {note}")
        print(rows[-1], flush=True)

    print(f"# pytest-sandbox services bench  cache={cache}  n={args.n}  cores={os.cpu_count()}")
    sqldir = Path(tempfile.mkdtemp(prefix="svcsql-"))
    with LocalBackend(cache) as b:
        for tables in args.tables:
            sql = sqldir / f"schema{tables}.sql"
            sql.write_text(schema(tables))
            t = time.perf_counter()
            snap = b.build(recipe(sql))
            row(f"[{tables} tables] build (once per recipe)", f"{time.perf_counter() - t:7.1f} s")

            def sandbox_one(i: int, snap: Snapshot = snap) -> tuple[float, Callable[[], None]]:
                return sandbox_test(b, snap, psycopg)

            # Cold: no warm pool, the server starts while the test waits.
            pool_after = b._pool.HOT_AFTER
            b._pool.HOT_AFTER = 1 << 30
            settle(b)
            FIXTURE.clear()
            cold = series(sandbox_one, max(5, args.n // 4), 0.0)
            b._pool.HOT_AFTER = pool_after
            row(f"[{tables} tables] sandbox, cold: fixture wait", f"p50 {ms(pct(FIXTURE, 50))}",
                f"p95 {ms(pct(FIXTURE, 95))}  (the server starts while the test waits)")  # fmt: skip
            row(
                f"[{tables} tables] sandbox, cold: to first query",
                f"p50 {ms(pct(cold, 50))}",
                f"p95 {ms(pct(cold, 95))}",
            )
            warm_p50: dict[float, float] = {}
            for body_ms in args.body_ms:
                series(sandbox_one, 4, body_ms / 1000)  # the pool learns this snapshot is hot
                FIXTURE.clear()
                warm = series(sandbox_one, args.n, body_ms / 1000)
                warm_p50[body_ms] = pct(warm, 50)
                row(
                    f"[{tables} tables] warm pool, body {body_ms:g} ms: fixture wait",
                    f"p50 {ms(pct(FIXTURE, 50))}",
                    f"p95 {ms(pct(FIXTURE, 95))}  (target p50 < 20 ms)",
                )
                row(
                    f"[{tables} tables] warm pool, body {body_ms:g} ms: to first query",
                    f"p50 {ms(pct(warm, 50))}",
                    f"p95 {ms(pct(warm, 95))}  (fixture + connect + first query)",
                )
            settle(b)
            if have_janitor:
                with host_server(tables, sql) as (port, tmpl):

                    def janitor_one(i: int, port: int = port, tmpl: str = tmpl) -> tuple[float, Callable[[], None]]:
                        return janitor_test(port, tmpl, i, psycopg)

                    jan = series(janitor_one, args.n, 0.0)
                    row(
                        f"[{tables} tables] pytest-postgresql: to first query",
                        f"p50 {ms(pct(jan, 50))}",
                        f"p95 {ms(pct(jan, 95))}",
                    )
                    for body_ms, p50 in warm_p50.items():
                        row(f"[{tables} tables] ratio pytest-postgresql / sandbox, first query, body {body_ms:g}",
                            f"{pct(jan, 50) / p50:7.1f}x")  # fmt: skip
                    jt = throughput(janitor_one, args.seconds)
                    row(f"[{tables} tables] pytest-postgresql throughput, 2 threads", f"{jt:7.1f} tests/s")
            st = throughput(sandbox_one, args.seconds)
            row(f"[{tables} tables] sandbox throughput, 2 threads (own server each)", f"{st:7.1f} tests/s")
    print("\n".join(["", "# summary", *rows]))


if __name__ == "__main__":
    main()
