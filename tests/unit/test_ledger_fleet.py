"""The ledger's reads for the fleet view (issue 15): each agent's heartbeat with its figures, and the
files in flight per agent, bounded however large the ledger. Run on SQLite here and on PostgreSQL
by tests/integration/test_ledger_postgres.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.core.lifecycle import Event, State
from edge_agent.ledger import Ledger

from .ledgers import open_ledger
from .test_ledger import _due_files

S, E = State, Event


@pytest.fixture
def ledger(tmp_path: Path, clock: Any) -> Any:
    led = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock)     # SQLite, or PostgreSQL there
    yield led
    led.close()


def test_a_heartbeat_stores_the_agents_figures_and_the_next_one_replaces_them(ledger: Ledger, clock: Any) -> None:
    ledger.heartbeat("a1", "daq-1", 111, "1.0", clock(), {"sent_bytes_per_s": 1000.0, "in_flight": 3})
    ledger.heartbeat("a2", "daq-2", 222, "0.9", clock())          # an agent that reports nothing
    a1, a2 = ledger.agents()
    assert a1["stats"] == {"sent_bytes_per_s": 1000.0, "in_flight": 3} and a2["stats"] == {}
    clock.advance(30)
    ledger.heartbeat("a1", "daq-1", 111, "1.0", clock(), {"sent_bytes_per_s": 0.0, "in_flight": 0})
    a1 = ledger.agents()[0]
    assert a1["stats"] == {"sent_bytes_per_s": 0.0, "in_flight": 0}
    assert (a1["heartbeat_at"] - a1["started_at"], a1["host"], a1["version"]) == (30, "daq-1", "1.0")


def test_files_in_flight_are_counted_per_agent_and_state_with_the_leases_that_ran_out(ledger: Ledger,
                                                                                     clock: Any) -> None:
    now = clock()
    ids = _due_files(ledger, 6)
    ledger.claim("a1", [S.COMPLETE], now, 3, lease_s=300)               # ids[0:3]: leases running
    ledger.claim("a2", [S.COMPLETE], now, 2, lease_s=30)                # ids[3:5]: run out at now + 30
    ledger.release("a1", ids[2:3])                                      # given back: no longer in flight
    ledger.transition(ids[1], S.COMPLETE, E.HASHED, holder="a1", blake3="b", scope="s", name="n1", adler32="1")
    got = ledger.in_flight(now + 60)
    assert set(got) == {"a1", "a2"}
    assert (got["a1"]["claims"], got["a1"]["expired"], got["a1"]["by_state"]) == (2, 0, {"complete": 1, "hashed": 1})
    assert (got["a2"]["claims"], got["a2"]["expired"], got["a2"]["by_state"]) == (2, 2, {"complete": 2})
    assert [f["file_id"] for f in got["a1"]["files"]] == ids[0:2]
    f = got["a2"]["files"][0]
    assert (f["file_id"], f["rule"], f["state"], f["size"], f["claim_until"]) == (ids[3], "r", "complete", 10, now + 30)
    assert f["path"] == "/daq/c3"
    # a1's claims count (agents()) says the same
    assert {a["agent_id"]: a["claims"] for a in ledger.agents()} == {}          # nobody heartbeated yet
    ledger.heartbeat("a1", "h", 1, "1", now)
    assert [(a["agent_id"], a["claims"]) for a in ledger.agents()] == [("a1", 2)]


def test_files_in_flight_list_a_few_per_agent_and_count_them_all(ledger: Ledger, clock: Any) -> None:
    now = clock()
    ids = _due_files(ledger, 7)
    for i, fid in enumerate(ids):             # leases ending in the reverse order of the ids
        ledger.claim("a1", [S.COMPLETE], now, 1, lease_s=300 - i, exclude=ids[:i])
    got = ledger.in_flight(now, per_agent=3)["a1"]
    assert got["claims"] == 7 and len(got["files"]) == 3
    assert [f["file_id"] for f in got["files"]] == ids[:-4:-1]          # the leases that end first
    ledger.release("a1", ids)
    assert ledger.in_flight(now) == {}


def test_files_in_flight_are_read_through_an_index_of_the_claimed_rows(ledger: Ledger) -> None:
    """A million-row ledger: the fleet view must not read every row (nor every row per agent)."""
    if ledger._dialect.name == "postgresql":
        defs = {r[0]: r[1] for r in ledger._db.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()")}
        assert "files_claims" in defs and "WHERE (claim_until > " in defs["files_claims"]
        return
    # the statements the ledger really runs (one claimed file, so that each of them runs)
    _due_files(ledger, 1)
    ledger.claim("a1", [S.COMPLETE], 0, 1, lease_s=30)
    ran: list[str] = []
    ledger._db.set_trace_callback(ran.append)
    try:
        ledger.in_flight(0)
        ledger.agents()
    finally:
        ledger._db.set_trace_callback(None)
    assert len(ran) == 3, ran
    plans = [" ".join(str(r[3]) for r in ledger._db.execute("EXPLAIN QUERY PLAN " + sql)) for sql in ran]
    assert all("files_claims" in p for p in plans), plans
    assert not any("SCAN files" in p or "SCAN f " in p for p in plans), plans


def test_the_agents_table_of_an_older_ledger_gains_the_figures_column(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "state" / "ledger.sqlite"
    Ledger(path, clock=clock).close()
    db = sqlite3.connect(path)       # as the agent of slice 2 made it: no stats column
    db.executescript("DROP TABLE agents; CREATE TABLE agents (agent_id TEXT PRIMARY KEY, host TEXT NOT NULL, "
                     "pid INTEGER, version TEXT, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL); "
                     "INSERT INTO agents VALUES ('old', 'h', 1, '0.9', 1, 2); DROP INDEX files_claims;")
    db.close()
    ro = Ledger(path, clock=clock, readonly=True)       # `edge-agent status --fleet` before the agent's upgrade
    try:
        assert [(a["agent_id"], a["stats"]) for a in ro.agents()] == [("old", {})]
    finally:
        ro.close()
    led = Ledger(path, clock=clock)
    try:
        led.heartbeat("new", "h2", 2, "1.0", clock(), {"in_flight": 1})
        assert [(a["agent_id"], a["stats"]) for a in led.agents()] == [("new", {"in_flight": 1}), ("old", {})]
        assert led._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'files_claims'").fetchone()
    finally:
        led.close()
