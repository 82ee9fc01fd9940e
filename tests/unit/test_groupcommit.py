"""Group commit: writers that queue share one COMMIT; none returns before its writes are durable;
one writer's failure is its own; a failed COMMIT fails them all."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.core.lifecycle import Event as E
from edge_agent.core.lifecycle import State as S
from edge_agent.groupcommit import CommitFailed, GroupCommit
from edge_agent.ledger import Ledger


def _db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY)")
    return db


def _committed(path: Path) -> set[int]:
    """What another connection (another process after a crash) finds."""
    other = sqlite3.connect(str(path))
    try:
        return {r[0] for r in other.execute("SELECT k FROM t")}
    finally:
        other.close()


def _wait_until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _grouped(gc: GroupCommit, path: Path, first_body: Any, second_body: Any) -> tuple[list[Any], list[Any]]:
    """Two writers made to share a group: the first ends its statements only once the second queues
    behind it, so it leaves the transaction open for the second, which commits it. Returns what
    each raised (or None)."""
    out: list[list[Any]] = [[], []]

    def first() -> None:
        try:
            with gc.transaction() as db:
                first_body(db)
                _wait_until(lambda: gc._queued == 1)
        except BaseException as exc:  # noqa: BLE001
            out[0].append(exc)
        else:
            out[0].append(None)

    def second() -> None:
        try:
            with gc.transaction() as db:
                second_body(db)
        except BaseException as exc:  # noqa: BLE001
            out[1].append(exc)
        else:
            out[1].append(None)

    t1 = threading.Thread(target=first)
    t1.start()
    _wait_until(lambda: gc._open is not None and gc._open.members == 1)
    t2 = threading.Thread(target=second)
    t2.start()
    t1.join(10)
    t2.join(10)
    return out[0], out[1]


def test_a_lone_writer_commits_at_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    gc = GroupCommit(_db(path), threading.RLock())
    with gc.transaction() as db:
        db.execute("INSERT INTO t VALUES (1)")
    assert _committed(path) == {1}
    assert (gc.commits, gc.members) == (1, 1)


def test_writers_queued_behind_one_share_its_commit_and_return_only_once_it_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    gc = GroupCommit(_db(path), threading.RLock())
    seen_after_return: dict[int, bool] = {}

    def write(k: int) -> None:
        with gc.transaction() as db:
            db.execute("INSERT INTO t VALUES (?)", (k,))
            time.sleep(0.002)    # others queue meanwhile
        seen_after_return[k] = k in _committed(path)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert _committed(path) == set(range(40))
    assert all(seen_after_return.values()) and len(seen_after_return) == 40
    assert gc.members == 40
    assert gc.commits < 40          # some writers shared a commit


def test_a_writer_that_fails_rolls_back_alone_and_the_group_commits_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    gc = GroupCommit(_db(path), threading.RLock())

    def bad(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (2)")
        raise ValueError("the second writer's own failure")

    first, second = _grouped(gc, path, lambda db: db.execute("INSERT INTO t VALUES (1)"), bad)
    assert first == [None]
    assert isinstance(second[0], ValueError)
    assert _committed(path) == {1}
    assert gc.commits == 1


def test_a_failed_commit_fails_every_member_and_the_connection_works_afterwards(tmp_path: Path) -> None:
    from tests.unit.test_ledger import _FailingCommit
    path = tmp_path / "db.sqlite"
    gc = GroupCommit(_FailingCommit(_db(path)), threading.RLock())  # type: ignore[arg-type]
    first, second = _grouped(gc, path, lambda db: db.execute("INSERT INTO t VALUES (1)"),
                             lambda db: db.execute("INSERT INTO t VALUES (2)"))
    assert isinstance(first[0], CommitFailed) and isinstance(second[0], CommitFailed)
    assert _committed(path) == set()
    with gc.transaction() as db:
        db.execute("INSERT INTO t VALUES (3)")
    assert _committed(path) == {3}


def test_a_member_whose_own_failure_came_from_a_group_that_was_lost_is_told_the_group_failed(tmp_path: Path) -> None:
    """Its failure may rest on another member's write that never became durable."""
    path = tmp_path / "db.sqlite"
    db0 = _db(path)

    class FailingCommit:
        def __getattr__(self, name: str) -> Any:
            return getattr(db0, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return db0.execute(sql, *args)

    gc = GroupCommit(FailingCommit(), threading.RLock())  # type: ignore[arg-type]

    def clash(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (1)")   # the first writer's row, not yet committed

    first, second = _grouped(gc, path, lambda db: db.execute("INSERT INTO t VALUES (1)"), clash)
    assert isinstance(first[0], CommitFailed)
    assert isinstance(second[0], CommitFailed)
    assert isinstance(second[0].__cause__, sqlite3.IntegrityError)


def test_the_ledger_never_reads_a_groups_writes_before_they_are_committed(tmp_path: Path) -> None:
    """A read may lead to an effect outside the ledger (a copy removed, a file deleted): it must
    not act on a transition that a crash could still undo."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rec = ledger.discover("r", b"/buf/a", "a", 1, 2, 3, 4, 0)
    moved = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with ledger._tx() as db:
            ledger._transition(db, rec.id, S.DISCOVERED, E.COMPLETED, None, {})
            moved.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert moved.wait(10)
    try:
        assert ledger.get(rec.id).state is S.DISCOVERED      # another thread: the committed state
    finally:
        release.set()
        t.join(10)
    assert ledger.get(rec.id).state is S.COMPLETE
    ledger.close()


def test_a_ledger_write_from_many_threads_is_committed_when_each_returns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    recs = [ledger.discover("r", f"/buf/{i}".encode(), str(i), 1, i + 10, 3, 4, 0) for i in range(30)]
    ok: list[bool] = []

    def move(fid: int) -> None:
        ledger.transition(fid, S.DISCOVERED, E.COMPLETED)
        other = sqlite3.connect(str(path))
        ok.append(other.execute("SELECT state FROM files WHERE id = ?", (fid,)).fetchone()[0] == S.COMPLETE.value)
        other.close()

    threads = [threading.Thread(target=move, args=(r.id,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert ok == [True] * 30
    ledger.close()


def test_stale_transition_inside_a_group_does_not_undo_the_others(tmp_path: Path) -> None:
    from edge_agent.ledger import StaleTransition
    ledger = Ledger(tmp_path / "ledger.sqlite")
    a = ledger.discover("r", b"/buf/a", "a", 1, 2, 3, 4, 0)
    b = ledger.discover("r", b"/buf/b", "b", 1, 5, 3, 4, 0)
    gc = ledger._writes
    first, second = _grouped(
        gc, tmp_path,
        lambda db: ledger._transition(db, a.id, S.DISCOVERED, E.COMPLETED, None, {}),
        lambda db: ledger._transition(db, b.id, S.COMPLETE, E.HASHED, None, {}))
    assert first == [None]
    assert isinstance(second[0], StaleTransition)
    assert ledger.get(a.id).state is S.COMPLETE and ledger.get(b.id).state is S.DISCOVERED
    ledger.close()


@pytest.mark.parametrize("members", [1, 3])
def test_close_commits_a_group_left_open(tmp_path: Path, members: int) -> None:
    path = tmp_path / "db.sqlite"
    lock = threading.RLock()
    gc = GroupCommit(_db(path), lock)
    with lock:
        gc._db.execute("BEGIN IMMEDIATE")
        from edge_agent.groupcommit import _Group
        gc._open = _Group(members=members)
        for k in range(members):
            gc._db.execute("INSERT INTO t VALUES (?)", (k,))
        gc.close_open()
    assert _committed(path) == set(range(members))


def test_a_transaction_inside_another_is_refused(tmp_path: Path) -> None:
    gc = GroupCommit(_db(tmp_path / "db.sqlite"), threading.RLock())
    with pytest.raises(RuntimeError, match="inside another"):
        with gc.transaction() as db:
            db.execute("INSERT INTO t VALUES (1)")
            with gc.transaction():
                pass
    assert _committed(tmp_path / "db.sqlite") == set()
    with gc.transaction() as db:                      # and the connection is usable afterwards
        db.execute("INSERT INTO t VALUES (2)")
    assert _committed(tmp_path / "db.sqlite") == {2}


def test_reads_from_many_short_lived_threads_do_not_open_a_connection_each(tmp_path: Path) -> None:
    """The status server answers each request on a thread of its own: one read connection per
    thread would leak one (and its file descriptors) per scrape."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rec = ledger.discover("r", b"/buf/a", "a", 1, 2, 3, 4, 0)
    for _ in range(50):
        t = threading.Thread(target=ledger.get, args=(rec.id,))
        t.start()
        t.join()
    assert len(ledger._all_readers) <= 2
    ledger.close()


def test_a_full_disk_that_undoes_the_whole_group_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    """SQLite rolls the whole transaction back on SQLITE_FULL: the savepoint is gone too, and the
    operator must read 'disk is full', not 'no such savepoint'."""
    path = tmp_path / "db.sqlite"
    db = _db(path)
    db.execute("CREATE TABLE big (x BLOB)")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 3}")
    gc = GroupCommit(db, threading.RLock(), max_age_s=10)
    first, second = _grouped(gc, path, lambda c: c.execute("INSERT INTO t VALUES (1)"),
                             lambda c: c.execute("INSERT INTO big VALUES (zeroblob(100000))"))
    assert isinstance(first[0], CommitFailed) and isinstance(second[0], CommitFailed)
    assert "full" in str(first[0]) and first[0].cause.sqlite_errorcode & 0xFF == 13
    assert _committed(path) == set()
    db.execute("PRAGMA max_page_count = 100000")
    with gc.transaction() as c:
        c.execute("INSERT INTO t VALUES (5)")
    assert _committed(path) == {5}


def test_a_writer_interrupted_while_queued_does_not_hold_later_groups_open(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    class Interrupted(threading.Thread):
        pass

    lock = threading.RLock()

    class Lock:
        """The write lock, whose first wait is interrupted (a signal, a KeyboardInterrupt)."""
        def __init__(self) -> None:
            self.interrupt = True

        def acquire(self) -> bool:
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return lock.acquire()

        def release(self) -> None:
            lock.release()

        def __enter__(self) -> None:
            self.acquire()

        def __exit__(self, *a: Any) -> None:
            self.release()

    gc = GroupCommit(_db(path), Lock())  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        with gc.transaction():
            pass
    assert gc._queued == 0
    done = threading.Event()

    def lone() -> None:
        with gc.transaction() as db:
            db.execute("INSERT INTO t VALUES (1)")
        done.set()

    threading.Thread(target=lone, daemon=True).start()
    assert done.wait(5), "a lone writer waited for a writer that never came"
    assert _committed(path) == {1}


def test_a_reader_never_creates_a_ledger_that_was_deleted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / f"ledger.sqlite{suffix}"
        if p.exists():
            p.unlink()
    busy, release = threading.Event(), threading.Event()

    def writer_busy() -> None:            # a writer at work: reads go through a read connection
        with ledger._lock:
            busy.set()
            release.wait(10)

    t = threading.Thread(target=writer_busy)
    t.start()
    assert busy.wait(5)
    try:
        with pytest.raises(sqlite3.OperationalError):
            ledger.get(1)
    finally:
        release.set()
        t.join(5)
    assert not (tmp_path / "ledger.sqlite").exists()
    assert ledger.probe() is not None


def test_reads_use_the_write_connection_while_nobody_writes_and_never_while_a_group_is_open(tmp_path: Path) -> None:
    """Its page cache is warm (a read connection's is dropped whenever the database changed); but
    a group left open for writers queued behind it holds writes not yet committed."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rec = ledger.discover("r", b"/buf/a", "a", 1, 2, 3, 4, 0)
    ledger.get(rec.id)
    assert ledger._all_readers == []                      # nobody writing: no read connection needed
    with ledger._lock:
        ledger._db.execute("BEGIN IMMEDIATE")             # as a group left open between its writers
        ledger._db.execute("UPDATE files SET state = 'complete' WHERE id = ?", (rec.id,))
    try:
        assert ledger.get(rec.id).state is S.DISCOVERED   # the committed state, through a read connection
        assert len(ledger._all_readers) == 1
    finally:
        with ledger._lock:
            ledger._db.execute("ROLLBACK")
    ledger.close()
