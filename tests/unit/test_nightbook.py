"""The ledger's book of nights (nightbook.py): nights recorded as files are hashed into them, a night
being closed takes no more files, and the reads a close-out needs. Run on PostgreSQL too
(tests/integration/test_ledger_postgres.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.core.lifecycle import Event, State
from edge_agent.ledger import Ledger
from edge_agent.nightbook import CLOSED, CLOSING, OPEN, NightClosed

from .ledgers import open_ledger

S, E = State, Event


@pytest.fixture
def ledger(tmp_path: Path, clock: Any) -> Any:
    led = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock)
    yield led
    led.close()


def hashed(led: Ledger, path: bytes, dataset: str, night: tuple[str, float] | None = ("20240310", 100.0),
           rule: str = "r") -> Any:
    rec = led.discover(rule, path, path.decode(), dev=1, inode=hash(path) % 1000, size=10, mtime_ns=123, priority=0)
    rec = led.transition(rec.id, S.DISCOVERED, E.COMPLETED)
    return led.transition(rec.id, S.COMPLETE, E.HASHED, blake3="b", adler32="00000001", size=10, scope="s",
                          name=path.decode(), dataset=dataset, night=night)


def test_a_night_is_recorded_open_by_its_first_file_and_listed(ledger: Ledger, clock: Any) -> None:
    hashed(ledger, b"/d/a", "r.20240310")
    hashed(ledger, b"/d/b", "r.20240310")
    hashed(ledger, b"/d/c", "r.20240311", night=("20240311", 200.0))
    rows = ledger.unclosed_nights("r")
    assert [(x["dataset"], x["night"], x["ends_at"], x["state"]) for x in rows] == [
        ("r.20240310", "20240310", 100.0, OPEN), ("r.20240311", "20240311", 200.0, OPEN)]
    assert rows[0]["opened_at"] == clock.now and rows[0]["late_of"] is None
    assert [x["dataset"] for x in ledger.nights(1)] == ["r.20240311"]
    assert ledger.night_states("r", ["r.20240310", "nope"]) == {"r.20240310": OPEN}


def test_a_move_without_night_records_none(ledger: Ledger) -> None:
    hashed(ledger, b"/d/a", "r.20240310", night=None)
    assert ledger.nights() == []


def test_a_night_being_closed_takes_no_file_and_its_late_dataset_is_marked(ledger: Ledger) -> None:
    hashed(ledger, b"/d/a", "r.20240310")
    assert ledger.set_night("r", "r.20240310", OPEN, CLOSING)
    assert not ledger.set_night("r", "r.20240310", OPEN, CLOSING)    # compare and set
    with pytest.raises(NightClosed):
        hashed(ledger, b"/d/late", "r.20240310")
    late = ledger.find("/d/late")[0]
    assert late.state is S.COMPLETE and late.dataset is None        # nothing of the move was committed
    ledger.transition(late.id, S.COMPLETE, E.HASHED, dataset="r.20240310.late", night=("20240310", 100.0))
    assert ledger.night_states("r", ["r.20240310.late"]) == {"r.20240310.late": OPEN}
    assert ledger.nights(10)[0]["late_of"] == "r.20240310"


def test_closing_records_the_verdict_and_the_summary_counts_it(ledger: Ledger, clock: Any) -> None:
    hashed(ledger, b"/d/a", "r.20240310")
    hashed(ledger, b"/d/b", "r.20240310.late")
    ledger.set_night("r", "r.20240310", OPEN, CLOSING)
    assert ledger.set_night("r", "r.20240310", CLOSING, CLOSED, verdict="incomplete", reasons=["b: quarantined"],
                            files=2, bytes=20, manifest="s:r.20240310.manifest.json", closed_at=clock.now)
    row = ledger.nights(10, rule="r")[1]
    assert (row["state"], row["verdict"], row["reasons"], row["files"], row["manifest"]) == (
        CLOSED, "incomplete", ["b: quarantined"], 2, "s:r.20240310.manifest.json")
    assert [x["dataset"] for x in ledger.unclosed_nights("r")] == ["r.20240310.late"]
    with pytest.raises(KeyError):
        ledger.set_night("r", "r.20240310", CLOSED, CLOSED, dataset_name="x")
    summary = {(x["state"], x["verdict"]): x for x in ledger.night_summary()}
    assert summary[(CLOSED, "incomplete")]["nights"] == 1 and summary[(CLOSED, "incomplete")]["last_closed"] == clock.now
    assert summary[(OPEN, None)]["nights"] == 1


def test_night_files_gives_each_version_with_its_successors_state(ledger: Ledger) -> None:
    a = hashed(ledger, b"/d/a", "r.20240310")
    ledger.transition(a.id, S.HASHED, E.SUPERSEDED)
    a2 = ledger.discover("r", b"/d/a", "/d/a", dev=1, inode=9, size=11, mtime_ns=124, priority=0)
    waiting = ledger.discover("r", b"/d/w", "/d/w", dev=1, inode=8, size=1, mtime_ns=125, priority=0)
    got = {(rec.relpath, rec.version): succ for rec, succ in ledger.night_files("r", "r.20240310")}
    assert got == {("/d/a", 1): S.DISCOVERED}
    unhashed = {rec.id for rec, _ in ledger.night_files("r", None)}
    assert unhashed == {a2.id, waiting.id}


def test_an_older_ledger_gains_the_nights_table(tmp_path: Path, clock: Any) -> None:
    led = Ledger(tmp_path / "l.sqlite", clock=clock)
    led.close()
    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.execute("DROP TABLE nights")
    db.execute("DROP INDEX files_dataset")
    db.commit()
    db.close()
    led = Ledger(tmp_path / "l.sqlite", clock=clock)
    hashed(led, b"/d/a", "r.20240310")
    assert [x["dataset"] for x in led.nights()] == ["r.20240310"]
    led.close()
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'files_dataset'").fetchone() == (1,)
