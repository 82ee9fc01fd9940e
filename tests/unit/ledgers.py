"""The ledger the unit tests open: SQLite in the test's directory, or (where a test module of
tests/integration asks for it) a PostgreSQL schema of its own: the same tests, both databases."""

from __future__ import annotations

import os
from typing import Any

from edge_agent.ledger import Ledger

# (url, password) of the PostgreSQL schema the running test uses; None: SQLite
POSTGRES: tuple[str, str] | None = None


def open_ledger(path: str | os.PathLike[str], clock: Any, **kw: Any) -> Ledger:
    """The test's ledger at `path` (SQLite), or in its PostgreSQL schema: opened again at the same
    `path`, it is the same ledger either way."""
    if POSTGRES is not None:
        url, password = POSTGRES
        # leases on the tests' clock (their `now` is a fake one), not the server's: one test
        # (test_ledger_postgres) checks the server's
        kw.setdefault("lease_clock", "caller")
        return Ledger(url, clock=clock, password=password, **kw)
    return Ledger(path, clock=clock, **kw)


def _integrity_errors() -> tuple[type[BaseException], ...]:
    import sqlite3
    try:
        import psycopg
    except ImportError:
        return (sqlite3.IntegrityError,)
    return (sqlite3.IntegrityError, psycopg.IntegrityError)


# what a broken constraint raises, in either database
INTEGRITY_ERRORS = _integrity_errors()
