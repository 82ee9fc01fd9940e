"""The ledger on a real SQLite file, with a clock that only moves when the test says so."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.core.lifecycle import Event, IllegalTransition, State
from edge_agent.errors import LedgerUnwritable
from edge_agent.ledger import Ledger, Move, NameConflict, StaleTransition, display_path

from .ledgers import INTEGRITY_ERRORS, open_ledger

S, E = State, Event
P = b"/daq/run42/f1.fits"


@pytest.fixture
def ledger(tmp_path: Path, clock: Any) -> Any:
    led = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock)
    yield led
    led.close()


def discover(led: Ledger, path: bytes = P, rule: str = "r", size: int = 10, inode: int = 5,
             priority: int = 0) -> Any:
    return led.discover(rule, path, display_path(path), dev=1, inode=inode, size=size, mtime_ns=123,
                        priority=priority)


def walk(led: Ledger, fid: int, *events: Event) -> Any:
    rec = led.get(fid)
    for e in events:
        rec = led.transition(fid, rec.state, e)
    return rec


HAPPY = (E.COMPLETED, E.HASHED, E.REGISTERED, E.COPIED, E.TRANSFERRED, E.CONFIRMED, E.DELETED)


def test_creates_its_directory_and_schema(tmp_path: Path, clock: Any) -> None:
    led = Ledger(tmp_path / "a" / "b" / "ledger.sqlite", clock=clock)
    led.close()
    db = sqlite3.connect(tmp_path / "a" / "b" / "ledger.sqlite")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "files", "events", "replicas", "notices"} <= tables
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_discover(ledger: Ledger, clock: Any) -> None:
    rec = discover(ledger, size=10, priority=3)
    assert rec.state is S.DISCOVERED
    assert (rec.rule, rec.path, rec.relpath, rec.version) == ("r", P, P.decode(), 1)
    assert (rec.dev, rec.inode, rec.size, rec.mtime_ns, rec.priority) == (1, 5, 10, 123, 3)
    assert rec.first_seen == rec.changed_at == rec.updated_at == clock.now
    assert rec.attempts == 0 and rec.next_at == 0 and rec.resume_state is None
    assert ledger.live("r", P) == rec
    assert ledger.live("other-rule", P) is None


def test_happy_path_with_compare_and_set(ledger: Ledger, clock: Any) -> None:
    rec = discover(ledger)
    for e, want in zip(HAPPY, (S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED, S.DELETED)):
        clock.advance(10)
        rec = ledger.transition(rec.id, rec.state, e)
        assert rec.state is want
        assert rec.updated_at == clock.now
    assert rec.confirmed_at == clock.now - 10
    assert rec.deleted_at == clock.now
    assert ledger.live("r", P) is None   # a deleted row is not live


def test_transition_sets_columns(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED)
    rec = ledger.transition(rec.id, S.COMPLETE, E.HASHED, {"why": "test"}, blake3="b3", adler32="0000abcd",
                            scope="s", name="n", metadata='{"k": 1}')
    assert (rec.blake3, rec.adler32, rec.did, rec.meta) == ("b3", "0000abcd", "s:n", {"k": 1})


def test_unknown_column_is_refused_and_nothing_changes(ledger: Ledger) -> None:
    rec = discover(ledger)
    with pytest.raises(KeyError):
        ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED, bogus=1)
    assert ledger.get(rec.id).state is S.DISCOVERED
    assert len(ledger.history(rec.id)) == 1


def test_stale_transition(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED)
    with pytest.raises(StaleTransition, match="expected discovered, found complete"):
        ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED)
    assert ledger.get(rec.id).state is S.COMPLETE
    assert [h["event"] for h in ledger.history(rec.id)] == ["discovered", "completed"]


def test_stale_transition_for_a_missing_row(ledger: Ledger) -> None:
    with pytest.raises(StaleTransition):
        ledger.transition(999, S.DISCOVERED, E.COMPLETED)


def test_illegal_transition_changes_nothing(ledger: Ledger) -> None:
    rec = discover(ledger)
    with pytest.raises(IllegalTransition):
        ledger.transition(rec.id, S.DISCOVERED, E.CONFIRMED)
    assert ledger.get(rec.id) == rec
    # the transaction was rolled back: the ledger still works
    assert ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED).state is S.COMPLETE


def test_events_history(ledger: Ledger, clock: Any) -> None:
    rec = discover(ledger, size=10)
    clock.advance(1)
    ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED)
    clock.advance(1)
    ledger.transition(rec.id, S.COMPLETE, E.FAILED_RETRYABLE, {"reason": "disk busy", "attempt": 1})
    ledger.note(rec.id, S.RETRY_WAIT, "copy_written", {"location": "a"})
    h = ledger.history(rec.id)
    assert [(x["from_state"], x["to_state"], x["event"]) for x in h] == [
        (None, "discovered", "discovered"),
        ("discovered", "complete", "completed"),
        ("complete", "retry_wait", "failed_retryable"),
        ("retry_wait", "retry_wait", "copy_written"),
    ]
    assert h[0]["detail"] == {"size": 10, "inode": 5, "mtime_ns": 123, "version": 1}
    assert h[1]["detail"] is None
    assert h[2]["detail"] == {"reason": "disk busy", "attempt": 1}
    assert [x["at"] for x in h] == [clock.now - 2, clock.now - 1, clock.now, clock.now]
    errors = ledger.recent_errors()
    assert len(errors) == 1
    assert errors[0]["reason"] == "disk busy" and errors[0]["event"] == "failed_retryable"


def test_retry_wait_resumes_where_it_left(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED, E.HASHED)
    rec = ledger.transition(rec.id, S.HASHED, E.FAILED_RETRYABLE, attempts=1, next_at=50.0, reason="503")
    assert (rec.state, rec.resume_state, rec.attempts, rec.next_at, rec.reason) == (
        S.RETRY_WAIT, S.HASHED, 1, 50.0, "503")
    rec = ledger.transition(rec.id, S.RETRY_WAIT, E.RETRY_DUE)
    assert (rec.state, rec.resume_state, rec.reason) == (S.HASHED, None, None)
    assert rec.attempts == 1   # the count goes on until a step succeeds


def test_quarantine_from_retry_wait_keeps_the_resume_state(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED, E.HASHED, E.REGISTERED)
    ledger.transition(rec.id, S.REGISTERED, E.FAILED_RETRYABLE, attempts=4, next_at=99.0)
    rec = ledger.transition(rec.id, S.RETRY_WAIT, E.FAILED_PERMANENT, reason="gave up")
    assert (rec.state, rec.resume_state, rec.reason) == (S.QUARANTINED, S.REGISTERED, "gave up")
    rec = ledger.transition(rec.id, S.QUARANTINED, E.OPERATOR_RETRY)
    assert (rec.state, rec.resume_state, rec.attempts, rec.next_at, rec.reason) == (
        S.REGISTERED, None, 0, 0, None)


def test_explicit_resume_state(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED, E.HASHED, E.REGISTERED, E.COPIED, E.TRANSFERRED)
    rec = ledger.transition(rec.id, S.TRANSFERRED, E.FAILED_RETRYABLE, resume_state=S.REGISTERED)
    assert rec.resume_state is S.REGISTERED
    assert ledger.transition(rec.id, S.RETRY_WAIT, E.RETRY_DUE).state is S.REGISTERED


def test_changed_before_hashing_goes_back_to_discovered(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED, E.FAILED_RETRYABLE)
    rec = ledger.transition(rec.id, S.RETRY_WAIT, E.CHANGED)
    assert (rec.state, rec.resume_state) == (S.DISCOVERED, None)


def test_superseded_keeps_its_reason_and_frees_the_path(ledger: Ledger) -> None:
    rec = walk(ledger, discover(ledger).id, E.COMPLETED, E.HASHED)
    rec = ledger.transition(rec.id, S.HASHED, E.SUPERSEDED, reason="rewritten")
    assert (rec.state, rec.reason) == (S.SUPERSEDED, "rewritten")
    assert ledger.live("r", P) is None


def test_versions_increment_per_path(ledger: Ledger) -> None:
    first = discover(ledger)
    other = discover(ledger, path=b"/daq/other")
    walk(ledger, first.id, E.COMPLETED, E.HASHED, E.SUPERSEDED)
    second = discover(ledger)
    walk(ledger, second.id, *HAPPY)
    third = discover(ledger)
    assert (first.version, second.version, third.version, other.version) == (1, 2, 3, 1)
    assert discover(ledger, rule="r2").version == 1   # versions are per (rule, path)
    assert ledger.live("r", P) == ledger.get(third.id)


def test_one_live_row_per_rule_and_path(ledger: Ledger) -> None:
    rec = discover(ledger)
    # a discovery of a path that has a live row by now (another agent sharing the ledger saw it
    # first) gives back that row: one row per version, whoever saw it first
    assert discover(ledger).id == rec.id
    walk(ledger, rec.id, E.COMPLETED, E.FAILED_PERMANENT)   # quarantined is still live
    assert discover(ledger).id == rec.id
    assert len(list(ledger.iter_all())) == 1
    # and the database itself refuses a second live row
    with pytest.raises(INTEGRITY_ERRORS), ledger._tx() as db:
        ledger._insert_version(db, "r", rec.path, "x", 1, 2, 3, 4, 0)
    assert len(list(ledger.iter_all())) == 1   # the failed insert left nothing behind
    # the ledger is usable after the failed insert (its transaction was rolled back)
    assert discover(ledger, path=b"/daq/other").state is S.DISCOVERED


def test_reopening_keeps_everything(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "ledger.sqlite"
    led = open_ledger(path, clock=clock)
    rec = walk(led, discover(led).id, E.COMPLETED)
    rec = led.transition(rec.id, S.COMPLETE, E.HASHED, blake3="b3", adler32="00000001", scope="s", name="n")
    led.record_replica(rec.id, "a", "file:///a/n", 10, "00000001", "written")
    led.notice("r", b"/daq/link", "symlink", "symlinks are never followed")
    led.close()

    again = open_ledger(path, clock=clock)
    try:
        assert again.get(rec.id) == rec
        assert [h["event"] for h in again.history(rec.id)] == ["discovered", "completed", "hashed"]
        assert again.replicas(rec.id)[0]["url"] == "file:///a/n"
        assert again.notices()[0]["relpath"] == "/daq/link"
        assert discover(again, path=b"/daq/next").id == rec.id + 1
    finally:
        again.close()


def test_restat(ledger: Ledger, clock: Any) -> None:
    rec = discover(ledger, size=10)
    clock.advance(7)
    rec2 = ledger.restat(rec.id, dev=1, inode=5, size=20, mtime_ns=456)
    assert (rec2.size, rec2.mtime_ns, rec2.changed_at, rec2.state) == (20, 456, clock.now, S.DISCOVERED)
    assert len(ledger.history(rec.id)) == 1   # not an event


def _hashed(led: Ledger, path: bytes, blake3: str, name: str = "n", scope: str = "s") -> Any:
    rec = walk(led, discover(led, path=path).id, E.COMPLETED)
    return led.transition(rec.id, S.COMPLETE, E.HASHED, blake3=blake3, scope=scope, name=name)


def test_a_name_is_bound_to_one_content(ledger: Ledger) -> None:
    old = _hashed(ledger, b"/daq/f", "AAAA")
    hold = ledger.name_hold("s", "n")
    assert hold is not None and (hold.owner, hold.state, hold.blake3, hold.owner_final) == (old.id, "bound",
                                                                                             "AAAA", False)
    # other bytes cannot take the name: the transition is refused whole
    rec = walk(ledger, discover(ledger, path=b"/daq/g").id, E.COMPLETED)
    with pytest.raises(NameConflict):
        ledger.transition(rec.id, S.COMPLETE, E.HASHED, blake3="BBBB", scope="s", name="n")
    assert ledger.get(rec.id).state is S.COMPLETE and ledger.get(rec.id).name is None
    # the same bytes share it; another scope or name is another name
    assert _hashed(ledger, b"/daq/h", "AAAA").name == "n"
    assert _hashed(ledger, b"/daq/i", "BBBB", scope="other").name == "n"
    walk(ledger, old.id, E.REGISTERED, E.COPIED, E.TRANSFERRED, E.CONFIRMED, E.DELETED)
    hold = ledger.name_hold("s", "n")
    assert hold is not None and hold.blake3 == "AAAA" and hold.owner_final   # a deleted copy still holds it


def test_a_reserved_name_is_nobody_elses_until_bound_or_dropped(ledger: Ledger) -> None:
    a = walk(ledger, discover(ledger, path=b"/daq/a").id, E.COMPLETED)
    b = walk(ledger, discover(ledger, path=b"/daq/b").id, E.COMPLETED)
    assert ledger.reserve_name("s", "n", a.id) and not ledger.reserve_name("s", "n", b.id)
    with pytest.raises(NameConflict):        # not even the same bytes: a's are not known yet
        ledger.transition(b.id, S.COMPLETE, E.HASHED, blake3="AAAA", scope="s", name="n")
    ledger.drop_reservation("s", "n", b.id)  # only the owner can drop it
    assert ledger.name_hold("s", "n") is not None
    ledger.drop_reservation("s", "n", a.id)
    assert ledger.name_hold("s", "n") is None and ledger.reserve_name("s", "n", b.id)


def test_a_copy_is_removed_only_while_no_other_version_counts_it(ledger: Ledger) -> None:
    a = _hashed(ledger, b"/daq/a", "AAAA")
    b = _hashed(ledger, b"/daq/b", "AAAA")               # the same bytes from another path: shares it
    walk(ledger, b.id, E.REGISTERED, E.COPIED, E.TRANSFERRED, E.CONFIRMED, E.DELETED)
    ledger.transition(a.id, S.HASHED, E.SUPERSEDED)
    assert not ledger.begin_removal("s", "n", a.id)      # b was deleted locally on the strength of it
    hold = ledger.name_hold("s", "n")
    assert hold is not None and hold.owner == b.id and hold.state == "bound"
    c = _hashed(ledger, b"/daq/c", "CCCC", name="m")
    ledger.transition(c.id, S.HASHED, E.SUPERSEDED)
    assert ledger.begin_removal("s", "m", c.id)
    assert ledger.name_hold("s", "m").state == "removing"   # type: ignore[union-attr]
    ledger.finish_removal("s", "m", c.id)
    assert ledger.name_hold("s", "m") is None


def test_an_older_ledger_gets_its_names_bound(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "old.sqlite"
    led = Ledger(path, clock=clock)
    rec = _hashed(led, b"/daq/f", "AAAA")
    led._db.execute("DELETE FROM names")            # as a ledger written before the names table
    led._db.execute("DELETE FROM meta WHERE key = 'names_filled'")
    led.close()
    led = Ledger(path, clock=clock)
    try:
        hold = led.name_hold("s", "n")
        assert hold is not None and (hold.owner, hold.blake3) == (rec.id, "AAAA")
    finally:
        led.close()


def test_replicas_upsert(ledger: Ledger, clock: Any) -> None:
    rec = discover(ledger)
    ledger.record_replica(rec.id, "b", "file:///b/x", 10, "0000000a", "written")
    ledger.record_replica(rec.id, "a", "file:///a/x", 10, "0000000a", "written")
    clock.advance(5)
    ledger.record_replica(rec.id, "a", "file:///a/x", 9, "ffffffff", "bad")
    reps = ledger.replicas(rec.id)
    assert [(r["location"], r["state"], r["size"], r["adler32"]) for r in reps] == [
        ("a", "bad", 9, "ffffffff"), ("b", "written", 10, "0000000a")]
    assert reps[0]["at"] == clock.now
    assert ledger.replicas(rec.id + 1) == []


def test_notices(ledger: Ledger, clock: Any) -> None:
    assert ledger.notice("r", b"/daq/l", "symlink", "to /etc") is True
    clock.advance(1)
    assert ledger.notice("r", b"/daq/l", "symlink", "to /etc") is False   # the same again: not news
    clock.advance(1)
    assert ledger.notice("r", b"/daq/l", "symlink", "to /tmp") is True    # changed detail: news
    clock.advance(1)
    assert ledger.notice("r", b"/daq/\xff", "fifo", "not a regular file") is True
    ns = ledger.notices()
    assert [n["relpath"] for n in ns] == ["/daq/\\xff", "/daq/l"]
    first = ns[1]
    assert (first["count"], first["detail"], first["last_seen"] - first["first_seen"]) == (3, "to /tmp", 2)
    ledger.clear_notice(b"/daq/l")
    assert [n["relpath"] for n in ledger.notices()] == ["/daq/\\xff"]


def test_non_utf8_path_round_trips(ledger: Ledger) -> None:
    raw = b"/daq/run\xff\xfe/f\x80.fits"
    rec = discover(ledger, path=raw)
    assert rec.relpath == "/daq/run\\xff\\xfe/f\\x80.fits"
    got = ledger.get(rec.id)
    assert got.path == raw and isinstance(got.path, bytes)
    assert got.fspath.encode("utf-8", "surrogateescape") == raw
    assert ledger.live("r", raw) == got
    assert raw in ledger.live_paths("r")
    assert got.to_json()["path"] == "/daq/run\\xff\\xfe/f\\x80.fits"


def test_due_orders_by_priority_then_time(ledger: Ledger) -> None:
    a = walk(ledger, discover(ledger, path=b"/a", priority=0).id, E.COMPLETED)
    b = walk(ledger, discover(ledger, path=b"/b", priority=5).id, E.COMPLETED)
    c = walk(ledger, discover(ledger, path=b"/c", priority=0).id, E.COMPLETED)
    ledger.set_next_at(a.id, 20.0)
    ledger.set_next_at(c.id, 10.0)
    d = walk(ledger, discover(ledger, path=b"/d", priority=9).id, E.COMPLETED)
    ledger.set_next_at(d.id, 100.0)   # not due yet
    assert [r.id for r in ledger.due([S.COMPLETE], now=50.0, limit=10)] == [b.id, c.id, a.id]
    assert [r.id for r in ledger.due([S.COMPLETE], now=50.0, limit=10, exclude=[c.id])] == [b.id, a.id]
    assert [r.id for r in ledger.due([S.COMPLETE], now=50.0, limit=1)] == [b.id]
    assert ledger.due([S.HASHED], now=1e12, limit=10) == []


def test_counts_and_queries(ledger: Ledger) -> None:
    a = discover(ledger, path=b"/daq/a.fits", size=10)
    b = discover(ledger, path=b"/daq/b.fits", size=32)
    walk(ledger, b.id, E.COMPLETED)
    assert sorted(ledger.counts()) == [("r", "complete", 1, 32), ("r", "discovered", 1, 10)]
    assert [r.id for r in ledger.find("b.fits")] == [b.id]
    assert [r.id for r in ledger.find(str(a.id))] == [a.id]
    assert [r.id for r in ledger.in_states([S.COMPLETE, S.DISCOVERED])] == [a.id, b.id]
    assert ledger.in_states([S.COMPLETE], rule="other") == []
    assert ledger.oldest_unconfirmed() == ledger.get(a.id)
    # a quarantined file waits for a person (alerted apart); the oldest still on its way is next
    ledger.transition(a.id, S.DISCOVERED, E.FAILED_PERMANENT, reason="zero-byte")
    assert ledger.oldest_unconfirmed() == ledger.get(b.id)
    with pytest.raises(KeyError):
        ledger.get(12345)


def test_deleted_bytes_since(ledger: Ledger, clock: Any) -> None:
    rec = discover(ledger, size=42)
    walk(ledger, rec.id, *HAPPY)
    assert ledger.deleted_bytes_since(clock.now) == [(clock.now, 42)]
    assert ledger.deleted_bytes_since(clock.now + 1) == []


def test_a_ledger_from_an_older_agent_gains_new_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3 as _sq
    from edge_agent.ledger import Ledger as _L
    path = tmp_path / "old.sqlite"
    db = _sq.connect(path)
    db.executescript("CREATE TABLE files (id INTEGER PRIMARY KEY, rule TEXT NOT NULL, path BLOB NOT NULL, "
                     "relpath TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, "
                     "attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0, "
                     "priority INTEGER NOT NULL DEFAULT 0, first_seen REAL NOT NULL, changed_at REAL NOT NULL, "
                     "updated_at REAL NOT NULL);"
                     "INSERT INTO files (rule, path, relpath, version, state, first_seen, changed_at, updated_at) "
                     "VALUES ('r', X'61', 'a', 1, 'discovered', 1, 1, 1);")
    db.commit()
    db.close()
    rec = _L(path).get(1)
    assert rec.relpath == "a" and rec.lake_ref is None and rec.blake3 is None


class _FailingCommit:
    """A connection whose next COMMIT fails the way a full disk makes it fail, leaving the transaction open."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.fail = db, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.fail:
            self.fail = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)


def test_a_failed_commit_is_rolled_back_so_the_ledger_works_again_afterwards(ledger: Ledger) -> None:
    fid = discover(ledger).id
    ledger._db = ledger._writes._db = _FailingCommit(ledger._db)  # type: ignore[assignment]
    with pytest.raises(LedgerUnwritable, match="cannot be written: database or disk is full"):
        ledger.transition(fid, S.DISCOVERED, E.COMPLETED)
    assert ledger.get(fid).state is S.DISCOVERED          # nothing half-recorded
    assert ledger.transition(fid, S.DISCOVERED, E.COMPLETED).state is S.COMPLETE   # and not wedged


def test_a_full_database_refuses_writes_and_recovers_when_there_is_room(ledger: Ledger) -> None:
    pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]
    ledger._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(LedgerUnwritable, match="full"):
        for i in range(2000):
            discover(ledger, path=b"/daq/%d" % i)
    n = len(list(ledger.iter_all()))
    ledger._db.execute("PRAGMA max_page_count = 1000000")
    fid = discover(ledger, path=b"/daq/after").id
    assert ledger.get(fid).state is S.DISCOVERED and len(list(ledger.iter_all())) == n + 1


def test_a_ledger_of_an_older_agent_gains_the_ctime_column(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "state" / "ledger.sqlite"
    led = Ledger(path, clock=clock)
    fid = discover(led).id
    led.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE files DROP COLUMN ctime_ns")      # as an agent before the column wrote it
    db.commit()
    db.close()
    led = Ledger(path, clock=clock)
    try:
        assert led.get(fid).ctime_ns is None                  # judged without it, as before
        led.transition(fid, S.DISCOVERED, E.COMPLETED)
        assert led.transition(fid, S.COMPLETE, E.HASHED, ctime_ns=42).ctime_ns == 42
    finally:
        led.close()


def test_a_version_that_ended_after_counting_a_copy_still_protects_it(ledger: Ledger) -> None:
    """Review 2, finding 3: c shared a's name (same bytes), was confirmed on its copies, then was
    superseded (its local file rewritten): its bytes live only in those copies; a, ending, must not
    remove them."""
    a = _hashed(ledger, b"/daq/a", "AAAA")
    c = _hashed(ledger, b"/daq/c", "AAAA")
    walk(ledger, c.id, E.REGISTERED, E.COPIED, E.TRANSFERRED, E.CONFIRMED, E.SUPERSEDED)
    ledger.transition(a.id, S.HASHED, E.SUPERSEDED)
    assert not ledger.begin_removal("s", "n", a.id)


def test_two_processes_writing_one_row_at_once_never_both_move_it(tmp_path: Path) -> None:
    """The agent and `edge-agent retry` (each a connection of its own) move one quarantined file at
    the same instant: one of them moves it, the other finds it moved. (PostgreSQL's READ COMMITTED
    let both read 'quarantined' and both write, until its writers took the ledger's lock as
    SQLite's BEGIN IMMEDIATE does: review of 2026-12-07, P1.)"""
    import threading
    import time as _time
    slow = threading.Event()

    def clock() -> float:
        if slow.is_set() and threading.current_thread().name == "agent":
            _time.sleep(0.5)           # between the move's read of the state and its write
        return _time.time()
    agent = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock)
    cli = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=_time.time)
    try:
        fid = walk(agent, discover(agent).id, E.COMPLETED, E.FAILED_PERMANENT).id
        out: dict[str, str] = {}

        def agent_move() -> None:
            try:
                out["agent"] = agent.transition(fid, S.QUARANTINED, E.SUPERSEDED).state.value
            except StaleTransition:
                out["agent"] = "stale"
        slow.set()
        t = threading.Thread(target=agent_move, name="agent")
        t.start()
        _time.sleep(0.2)
        try:
            out["cli"] = cli.transition(fid, S.QUARANTINED, E.OPERATOR_RETRY).state.value
        except StaleTransition:
            out["cli"] = "stale"
        t.join(30)
        moves = [h for h in agent.history(fid) if h["from_state"] == "quarantined"]
        assert len(moves) == 1 and sorted(out.values()) == sorted(["stale", moves[0]["to_state"]]), (out, moves)
        assert agent.get(fid).state.value == moves[0]["to_state"]
    finally:
        agent.close()
        cli.close()


# ---------------------------------------------------------------- claims: a ledger shared by agents (issue 15)

def _due_files(led: Ledger, n: int, prefix: bytes = b"/daq/c") -> list[int]:
    ids = []
    for i in range(n):
        ids.append(walk(led, discover(led, path=prefix + b"%d" % i).id, E.COMPLETED).id)
    return ids


def test_a_claimed_row_is_nobody_elses_until_its_lease_runs_out(ledger: Ledger, tmp_path: Path, clock: Any) -> None:
    other = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock)   # another agent, same ledger
    try:
        ids = _due_files(ledger, 3)
        now = clock()
        got = ledger.claim("a1", [S.COMPLETE], now, 2, lease_s=30)
        assert [r.id for r in got] == ids[:2] and {(r.claim_owner, r.claim_until) for r in got} == {("a1", now + 30)}
        assert [r.id for r in other.claim("a2", [S.COMPLETE], now, 10, lease_s=30)] == ids[2:]
        assert other.claim("a3", [S.COMPLETE], now + 29, 10, lease_s=30) == []       # all held
        # a1 died: once its lease has run out, its rows are anybody's
        taken = other.claim("a3", [S.COMPLETE], now + 31, 10, lease_s=30)
        assert sorted(r.id for r in taken) == ids and {r.claim_owner for r in taken} == {"a3"}
    finally:
        other.close()


def test_a_step_whose_claim_another_agent_took_commits_nothing(ledger: Ledger, clock: Any) -> None:
    [fid] = _due_files(ledger, 1)
    now = clock()
    ledger.claim("a1", [S.COMPLETE], now, 1, lease_s=30)
    # a1 stalls past its lease (SIGSTOP); a2 takes the row and hashes it
    ledger.claim("a2", [S.COMPLETE], now + 60, 1, lease_s=30)
    before = ledger.history(fid)
    with pytest.raises(StaleTransition, match="held by a2, not a1"):
        ledger.transition(fid, S.COMPLETE, E.HASHED, holder="a1", blake3="stale")
    assert ledger.get(fid).state is S.COMPLETE and ledger.get(fid).blake3 is None and ledger.history(fid) == before
    assert ledger.transition(fid, S.COMPLETE, E.FAILED_RETRYABLE, holder="a2").state is S.RETRY_WAIT
    # a batch: a move whose row is held by another agent is left out, the others go through
    [g, h] = _due_files(ledger, 2, prefix=b"/daq/d")
    ledger.claim("a1", [S.COMPLETE], now, 10, lease_s=30)
    ledger.claim("a2", [S.COMPLETE], now + 60, 1, lease_s=30)          # takes one of them (the first due)
    moved = ledger.transition_group([Move(x, S.COMPLETE, E.FAILED_RETRYABLE) for x in (g, h)], holder="a1")
    assert len(moved) == 1 and ledger.get(moved[0].id).claim_owner == "a1"
    # a row nobody holds is moved by any agent, as without claims
    [k] = _due_files(ledger, 1, prefix=b"/daq/e")
    assert ledger.transition(k, S.COMPLETE, E.FAILED_RETRYABLE, holder="a1").state is S.RETRY_WAIT


def test_a_claim_is_renewed_while_held_and_released_after(ledger: Ledger, clock: Any) -> None:
    ids = _due_files(ledger, 2)
    now = clock()
    ledger.claim("a1", [S.COMPLETE], now, 2, lease_s=30)
    assert ledger.renew("a1", ids, 90, now) == set(ids)
    assert ledger.claim("a2", [S.COMPLETE], now + 60, 10, lease_s=30) == []       # renewed: still a1's
    assert ledger.renew("a2", ids, 200, now) == set()                            # never another's
    ledger.release("a1", ids[:1])
    assert [r.id for r in ledger.claim("a2", [S.COMPLETE], now + 61, 10, lease_s=30)] == ids[:1]
    assert ledger.renew("a1", ids, 300, now) == {ids[1]}


def test_agents_are_seen_with_their_heartbeats_and_claims(ledger: Ledger, clock: Any) -> None:
    _due_files(ledger, 2)
    ledger.heartbeat("a1", "daq-1", 111, "0.1.0", clock())
    ledger.heartbeat("a2", "daq-2", 222, "0.1.0", clock())
    ledger.claim("a1", [S.COMPLETE], clock(), 2, lease_s=30)
    clock.advance(5)
    ledger.heartbeat("a1", "daq-1", 111, "0.1.0", clock())
    a1, a2 = ledger.agents()
    assert (a1["agent_id"], a1["host"], a1["claims"], a1["heartbeat_at"] - a1["started_at"]) == ("a1", "daq-1", 2, 5)
    assert (a2["agent_id"], a2["claims"]) == ("a2", 0)


def test_a_step_that_stalled_commits_nothing_after_the_agent_that_took_over_released_the_file(ledger: Ledger, clock: Any) -> None:
    """Review of 2026-12-07 (claims, 2): a1 stalls past its lease; a2 takes the file, its step ends
    and it gives the claim back; a1 wakes: with the row looking nobody's, a1's stale move went
    through (on a confirmation: old evidence over a newer look)."""
    [fid] = _due_files(ledger, 1)
    now = clock()
    ledger.claim("a1", [S.COMPLETE], now, 1, lease_s=30)
    ledger.claim("a2", [S.COMPLETE], now + 60, 1, lease_s=30)
    ledger.release("a2", [fid])
    with pytest.raises(StaleTransition):
        ledger.transition(fid, S.COMPLETE, E.HASHED, holder="a1", blake3="stale")
    assert ledger.get(fid).state is S.COMPLETE
    # released, the file is anybody's to claim
    assert [r.id for r in ledger.claim("a1", [S.COMPLETE], now + 61, 1, lease_s=30)] == [fid]


def test_an_agent_id_is_refused_while_another_place_runs_under_it(ledger: Ledger, clock: Any) -> None:
    """Two processes under one agent_id would each take the other's claims for their own."""
    from edge_agent.errors import AgentIdTaken
    ledger.enrol("a1", "m1:/srv/state", "daq-1", 11, "0", clock(), fresh_s=90)
    ledger.enrol("a1", "m1:/srv/state", "daq-1", 12, "0", clock(), fresh_s=90)     # the same place restarting
    clock.advance(60)
    with pytest.raises(AgentIdTaken, match="another edge-agent runs under this id"):
        ledger.enrol("a1", "m2:/srv/state", "daq-2", 21, "0", clock(), fresh_s=90)
    assert ledger.heartbeat("a1", "daq-1", 12, "0", clock(), place="m1:/srv/state")
    clock.advance(100)                     # silent for longer than fresh_s: taken over
    ledger.enrol("a1", "m2:/srv/state", "daq-2", 21, "0", clock(), fresh_s=90)
    [a1] = ledger.agents()
    assert a1["host"] == "daq-2"
    # the first process, back from its stall, learns it at its next heartbeat, and records nothing
    assert not ledger.heartbeat("a1", "daq-1", 12, "0", clock(), place="m1:/srv/state")
    assert ledger.agents()[0]["host"] == "daq-2"


def test_a_ledger_has_one_fleet_id(ledger: Ledger, tmp_path: Path, clock: Any) -> None:
    other = open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock)
    try:
        assert ledger.fleet_id() == other.fleet_id() == ledger.fleet_id() and len(ledger.fleet_id()) == 32
    finally:
        other.close()


def test_a_run_of_an_agent_takes_nothing_another_run_under_its_id_still_holds(ledger: Ledger, clock: Any) -> None:
    """Review of 2026-12-07 (fleet, 4): a process that took an agent_id over (the first one silent,
    perhaps only stalled) was handed that one's rows with their leases still running, and the
    fence let both commit. Each run claims under an epoch of its own."""
    [fid] = _due_files(ledger, 1)
    now = clock()
    ledger.claim("a1", [S.COMPLETE], now, 1, lease_s=300, epoch="run1")
    assert ledger.claim("a1", [S.COMPLETE], now + 100, 1, lease_s=300, epoch="run2") == []   # lease runs
    [taken] = ledger.claim("a1", [S.COMPLETE], now + 301, 1, lease_s=300, epoch="run2")      # ran out
    assert (taken.claim_owner, taken.claim_epoch) == ("a1", "run2")
    assert ledger.renew("a1", [fid], 300, now + 302, epoch="run1") == set()                   # run1 woke up
    with pytest.raises(StaleTransition, match="another run"):
        ledger.transition(fid, S.COMPLETE, E.HASHED, holder="a1", epoch="run1", blake3="stale")
    assert ledger.transition(fid, S.COMPLETE, E.FAILED_RETRYABLE, holder="a1", epoch="run2").state is S.RETRY_WAIT


def test_a_restart_at_the_same_place_takes_its_claims_back_at_once(ledger: Ledger, clock: Any) -> None:
    [fid] = _due_files(ledger, 1)
    ledger.enrol("a1", "m1:/srv/state", "daq-1", 11, "0", clock(), fresh_s=90)
    ledger.claim("a1", [S.COMPLETE], clock(), 1, lease_s=300, epoch="run1")
    clock.advance(5)                       # kill -9; the same state_dir (its lock: the old run is dead)
    ledger.enrol("a1", "m1:/srv/state", "daq-1", 12, "0", clock(), fresh_s=90)
    assert [r.id for r in ledger.claim("a1", [S.COMPLETE], clock(), 1, lease_s=300, epoch="run2")] == [fid]


def test_a_claim_given_back_is_not_renewed(ledger: Ledger, clock: Any) -> None:
    """Review of 2026-12-07 (fleet, 5): a renewal racing the end of a step gave a released row a
    fresh lease, which a dead agent then kept for a whole lease."""
    [fid] = _due_files(ledger, 1)
    ledger.claim("a1", [S.COMPLETE], clock(), 1, lease_s=60)
    ledger.release("a1", [fid])
    assert ledger.renew("a1", [fid], 60, clock()) == set() and ledger.get(fid).claim_until == 0
