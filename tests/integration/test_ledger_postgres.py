"""The ledger's tests and the steps' tests again, on PostgreSQL (issue 15): each test in a schema
of its own on the lake's PostgreSQL server (the edge_ledger database of scripts/lake/start.sh).

Left out: the tests about SQLite itself (its file, its pragmas, ledgers written by older agents,
which were all SQLite). What PostgreSQL adds (a connection the server drops) is tested below."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from edge_agent.core.lifecycle import Event, State
from edge_agent.errors import LedgerUnreachable
from edge_agent.ledger import Ledger

from ..pgledger import schema_url
from ..unit import ledgers
from ..unit.ledgers import open_ledger
from ..unit.conftest import _logging_reset_after_each_test, _no_edge_agent_env, clock, settings_data  # noqa: F401
from ..unit.steps.test_steps import *  # noqa: F403 - the same tests, on PostgreSQL
from ..unit.test_ledger import *  # noqa: F403
from ..unit.test_ledger_fleet import *  # noqa: F403
from ..unit.test_nightbook import *  # noqa: F403
from ..unit.test_ledger import _due_files, discover

pytestmark = pytest.mark.lake

SQLITE_ONLY = {
    "test_creates_its_directory_and_schema",
    "test_an_older_ledger_gets_its_names_bound",
    "test_a_ledger_from_an_older_agent_gains_new_columns",
    "test_a_failed_commit_is_rolled_back_so_the_ledger_works_again_afterwards",
    "test_a_full_database_refuses_writes_and_recovers_when_there_is_room",
    "test_a_ledger_of_an_older_agent_gains_the_ctime_column",
    "test_the_agents_table_of_an_older_ledger_gains_the_figures_column",
    "test_an_older_ledger_gains_the_nights_table",
}
for _name in SQLITE_ONLY:
    globals().pop(_name, None)


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


def test_these_tests_do_run_on_postgresql(ledger: Ledger) -> None:
    assert ledger.path is None and ledger.where.startswith("postgresql://")
    assert ledger._dialect.name == "postgresql"


def test_a_connection_the_server_drops_is_unwritable_then_comes_back(ledger: Ledger, pg: tuple[str, str]) -> None:
    """A PostgreSQL restart (or a network cut) drops the connection: the agent must stop new work
    (LedgerUnwritable, as for a full disk) and go on once the server answers, losing nothing."""
    import psycopg
    fid = discover(ledger).id
    url, password = pg
    with psycopg.connect(url, password=password, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'edge-agent' AND pid != pg_backend_pid() "
                      "AND datname = current_database()")
    with pytest.raises(LedgerUnreachable):
        ledger.transition(fid, State.DISCOVERED, Event.COMPLETED)
    # the next write connects again: the move is made once, nothing half-recorded
    assert ledger.transition(fid, State.DISCOVERED, Event.COMPLETED).state is State.COMPLETE
    assert ledger.get(fid).state is State.COMPLETE
    assert [h["event"] for h in ledger.history(fid)] == ["discovered", "completed"]


def test_a_server_out_of_reach_at_start_is_unwritable_and_names_no_secret(pg: tuple[str, str], clock: Any) -> None:
    url, password = pg
    dead = url.replace(url.split("@", 1)[1].split("/", 1)[0], "127.0.0.1:9")   # nothing listens on port 9
    with pytest.raises(LedgerUnreachable) as err:
        Ledger(dead, clock=clock, password=password, connect_timeout=2)
    assert password not in str(err.value) and "127.0.0.1:9" in str(err.value)


def test_every_connection_ends_stray_transactions_and_commits_durably(pg: tuple[str, str], clock: Any) -> None:
    """P2, P5 (review of 2026-12-07): a transaction an agent left open when its host died held its
    locks until TCP noticed, hours later, and the restarted agent waited for ever; and a role or
    URL saying synchronous_commit = off made commits acknowledged before they were durable."""
    url, password = pg
    led = Ledger(url.replace("?options=", "?options=-csynchronous_commit%3Doff%20"), clock=clock, password=password)
    try:
        got = {k: led._db.execute(f"SHOW {k}").fetchone()[0]
               for k in ("idle_in_transaction_session_timeout", "lock_timeout", "synchronous_commit")}
        assert got == {"idle_in_transaction_session_timeout": "10s", "lock_timeout": "30s", "synchronous_commit": "on"}
    finally:
        led.close()


def test_a_nul_in_a_reason_is_stored_not_refused(ledger: Ledger) -> None:
    """P7: PostgreSQL's text refuses NUL, which a reason quoting a hostile file name can carry: the
    failure that carries it must not fail in turn (SQLite stores it)."""
    fid = discover(ledger).id
    ledger.flag(fid, "bad name a\x00b")
    assert ledger.get(fid).reason in ("bad name a\\x00b", "bad name a\x00b")


def test_agents_claiming_at_once_never_hold_one_row(ledger: Ledger, tmp_path: Path, clock: Any) -> None:
    """Three agents (connections of their own) claim from one PostgreSQL ledger at once: every row
    is claimed, each by one agent. (SQLite is one host's ledger: its writers in other processes
    would queue behind a busy handler that is not fair.)"""
    import threading
    ids = _due_files(ledger, 60)
    others = [open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock) for _ in range(3)]
    got: dict[str, list[int]] = {}

    def agent(name: str, led: Ledger) -> None:
        mine: list[int] = []
        while batch := led.claim(name, [S.COMPLETE], clock(), 4, lease_s=300, exclude=mine):
            mine += [r.id for r in batch]
        got[name] = mine
    threads = [threading.Thread(target=agent, args=(f"a{i}", led)) for i, led in enumerate(others)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        claimed = [i for mine in got.values() for i in mine]
        assert sorted(claimed) == sorted(ids)          # every row claimed, and by one agent only
        assert len(got) == 3
    finally:
        for led in others:
            led.close()


def test_agents_starting_at_once_on_a_new_ledger_all_start(pg: tuple[str, str], clock: Any) -> None:
    """Review of the whole change: three agents started together on a new PostgreSQL ledger raced
    to create its tables, and all but one died of a unique violation in PostgreSQL's catalogue."""
    import threading
    url, password = pg
    failed: list[str] = []

    def start() -> None:
        try:
            Ledger(url, clock=clock, password=password).close()
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            failed.append(repr(exc))
    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failed == []


def test_leases_run_on_the_servers_clock(pg: tuple[str, str], clock: Any) -> None:
    """Agents on several hosts compare one clock: an agent whose wall clock runs an hour ahead (or
    stepped) does not take a claim another agent holds and renews; a lease is the server's time
    plus lease_s, whatever the callers' clocks say."""
    import time
    url, password = pg
    a1, a2 = Ledger(url, clock=clock, password=password), Ledger(url, clock=clock, password=password)
    try:
        ids = _due_files(a1, 2)
        before = time.time()
        got = a1.claim("a1", [State.COMPLETE], clock(), 2, lease_s=60)
        assert {r.id for r in got} == set(ids)
        assert all(before + 59 < (r.claim_until or 0) < time.time() + 61 for r in got)   # the server's now + 60
        assert a2.claim("a2", [State.COMPLETE], clock() + 3600, 10, lease_s=60) == []
        assert a1.renew("a1", ids, 60, clock() - 3600) == set(ids)                       # a clock behind: the same
        assert all((r.claim_until or 0) > time.time() + 55 for r in a1.get_many(ids))
    finally:
        a1.close()
        a2.close()


def test_a_ledger_of_the_claims_slice_gains_the_fleet_figures_and_the_claims_index(pg: tuple[str, str],
                                                                                  clock: Any) -> None:
    """A PostgreSQL ledger an agent of slice 2 made (agents without `stats`, no files_claims index)
    is brought up to date by the next agent that opens it, without losing its agents."""
    import psycopg
    url, password = pg
    Ledger(url, clock=clock, password=password).close()
    with psycopg.connect(url, password=password, autocommit=True) as db:
        db.execute("ALTER TABLE agents DROP COLUMN stats")
        db.execute("DROP INDEX files_claims")
        db.execute("INSERT INTO agents VALUES ('old', 'h', 1, '0.9', 1, 2)")
    led = Ledger(url, clock=clock, password=password)
    try:
        led.heartbeat("new", "h2", 2, "1.0", clock(), {"in_flight": 1})
        assert [(a["agent_id"], a["stats"]) for a in led.agents()] == [("new", {"in_flight": 1}), ("old", {})]
        assert led._db.execute("SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() "
                               "AND indexname = 'files_claims'").fetchone()
    finally:
        led.close()
