"""One uplink for a fleet (issue 15), on PostgreSQL: the tests of tests/unit/test_uplink.py again,
each in a schema of its own on the lake's PostgreSQL server (agents on several hosts share a
PostgreSQL ledger; a post's age is the server's clock)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.ledger import Ledger

from ..pgledger import schema_url
from ..unit import ledgers
from ..unit.conftest import _logging_reset_after_each_test, _no_edge_agent_env, clock, settings_data  # noqa: F401
from ..unit.test_uplink import *  # the same tests (and their fixture ledger_at), on PostgreSQL

pytestmark = pytest.mark.lake


@pytest.fixture
def pg(lake: Any) -> Iterator[tuple[str, str]]:
    yield from schema_url(lake)


@pytest.fixture(autouse=True)
def _on_postgres(pg: tuple[str, str]) -> Iterator[None]:
    ledgers.POSTGRES = pg
    try:
        yield
    finally:
        ledgers.POSTGRES = None


def test_these_tests_do_run_on_postgresql(ledger_at: Any) -> None:
    led: Ledger = ledger_at()
    assert led.path is None and led._dialect.name == "postgresql"
