"""Group commit: the writes of threads that queue for the ledger share one durable COMMIT.

A writer runs its statements inside a SAVEPOINT of one open transaction and returns only once
that transaction is committed (fsync'd, with synchronous=FULL): nothing is acknowledged before it
is durable, exactly as with a commit of its own. A writer that ends while others queue behind it
leaves the transaction open for them; the last of a group (nobody queued, or the group full or
old) commits it for all and wakes them. So a lone writer commits at once, as before, and groups
form only when writers queue, which is when one fsync per writer is what they wait for.

A writer whose own statements fail rolls back to its savepoint alone: the others' writes stay. A
COMMIT that fails (disk full, I/O error) fails every member with CommitFailed, also a member whose
own statements failed (its failure may have come from a state that never became durable).

Only the writes share a transaction: reads that may lead to an effect outside the ledger must not
see a member's writes before they are committed, so they go through another connection (WAL
readers see committed data only); see Ledger._query.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

# a group is committed once it has this many members or is this old, even with writers queued:
# what each member waits for stays a few milliseconds
MAX_MEMBERS = 64
MAX_AGE_S = 0.02


class CommitFailed(Exception):
    """The group's transaction could not be committed (or was lost mid-way): no member's writes
    are stored. `cause` is SQLite's error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Group:
    """One open transaction and the writers in it."""
    opened: float = field(default_factory=time.monotonic)
    members: int = 0
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    """The writes of one SQLite connection, grouped. `lock` guards the connection (whoever else
    uses it takes the same lock)."""

    def __init__(self, db: Any, lock: threading.RLock,
                 max_members: int = MAX_MEMBERS, max_age_s: float = MAX_AGE_S, *,
                 begin: tuple[str, ...] = ("BEGIN IMMEDIATE",),
                 errors: tuple[type[BaseException], ...] = (sqlite3.Error,)) -> None:
        self._db = db
        self._lock = lock
        self._begin = begin          # a write transaction the others wait for (SQLite: IMMEDIATE)
        self._errors = errors        # what the database's statements raise
        self._max_members = max_members
        self._max_age_s = max_age_s
        self._done = threading.Condition(threading.Lock())
        self._queued = 0                 # writers waiting for the lock (guarded by _done)
        self._open: _Group | None = None  # guarded by _lock
        self._inside = threading.local()
        self.commits = 0                  # COMMITs issued, for tests and the curious
        self.members = 0                  # writers whose writes were committed

    def inside(self) -> bool:
        """Is the calling thread in a write transaction (its reads must see its own writes)?"""
        return getattr(self._inside, "on", False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """The connection, inside a transaction shared with other writers. Exiting normally returns
        once this writer's statements are committed; an exception in the body rolls back this
        writer's statements and is raised once the group is settled (CommitFailed instead if the
        group's commit failed)."""
        if self.inside():
            # the inner one would commit the outer's group while its body still runs
            raise RuntimeError("a write transaction inside another one")
        with self._done:
            self._queued += 1
        try:
            self._lock.acquire()
        finally:
            # also when the wait is interrupted: a writer counted as queued that never comes would
            # keep every later group open waiting for it
            with self._done:
                self._queued -= 1
        try:
            group = self._join()
        except BaseException:
            self._settle(self._open)
            raise
        own: BaseException | None = None
        self._inside.on = True
        try:
            yield self._db
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the group is settled
            own = exc
        finally:
            self._inside.on = False
        try:
            self._leave(group, own)
        finally:
            self._settle(group)
        with self._done:
            while not group.done:
                self._done.wait()
        if group.error is not None:
            raise CommitFailed(group.error) from own
        if own is not None:
            raise own

    def _join(self) -> _Group:
        """With the lock held: the open group joined (begun if there is none), a savepoint set."""
        if self._open is None:
            for statement in self._begin:
                self._db.execute(statement)
            self._open = _Group()
        try:
            self._db.execute("SAVEPOINT member")
        except self._errors as exc:
            self._fail(self._open, exc)
            raise
        self._open.members += 1
        return self._open

    def _leave(self, group: _Group, own: BaseException | None) -> None:
        """With the lock held: this member's statements kept (no error of its own) or undone. A
        savepoint that cannot be released or rolled back (SQLite rolled the whole transaction back
        itself, e.g. on a full disk) fails the group, with the member's own SQLite error as the
        cause where it has one (the disk full, not the savepoint SQLite no longer has)."""
        if group.done:
            return
        try:
            if own is not None:
                self._db.execute("ROLLBACK TO member")
            self._db.execute("RELEASE member")
        except self._errors as exc:
            self._fail(group, own if isinstance(own, self._errors) else exc)

    def _settle(self, group: _Group | None) -> None:
        """With the lock held, and releasing it: the group committed now if nobody queues behind
        this writer (or it is full or old), else left open for those who do."""
        try:
            if group is None or group.done or group is not self._open:
                return
            full = group.members >= self._max_members or time.monotonic() - group.opened >= self._max_age_s
            with self._done:
                queued = self._queued
            if queued and not full:
                return
            self._commit(group)
        finally:
            self._lock.release()

    def _commit(self, group: _Group) -> None:
        """With the lock held: the group's transaction committed and its members woken (failed,
        all of them, if the COMMIT fails)."""
        try:
            self._db.execute("COMMIT")
        except self._errors as exc:
            self._fail(group, exc)
            return
        self.commits += 1
        self.members += group.members
        self._finish(group)

    def _fail(self, group: _Group | None, exc: BaseException) -> None:
        """The whole transaction undone (what SQLite has not undone itself): every member fails."""
        with contextlib.suppress(*self._errors):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        if group is not None and not group.done:
            group.error = exc
            self._finish(group)

    def _finish(self, group: _Group) -> None:
        if self._open is group:
            self._open = None
        with self._done:
            group.done = True
            self._done.notify_all()

    def close_open(self) -> None:
        """With the lock held (closing the connection): a group still open is committed first."""
        if self._open is not None:
            self._commit(self._open)
