"""A PostgreSQL ledger for tests: a schema of its own on the lake's PostgreSQL (the edge_ledger
database scripts/lake/start.sh makes), dropped afterwards."""

from __future__ import annotations

import urllib.parse
import uuid
from typing import Any, Iterator

import pytest


def schema_url(lake: Any) -> Iterator[tuple[str, str]]:
    """(URL whose search_path is a new schema, password); the schema is dropped afterwards."""
    import psycopg
    url = lake.env.get("EDGE_LAKE_LEDGER_URL")
    if not url:
        pytest.fail("the lake runs without PostgreSQL (EDGE_LAKE_RUCIO_DB=sqlite): no ledger database")
    password = lake.env["EDGE_LAKE_LEDGER_PASSWORD"]
    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, password=password, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}?options={urllib.parse.quote(f'-csearch_path={schema}')}", password
    finally:
        with psycopg.connect(url, password=password, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")
