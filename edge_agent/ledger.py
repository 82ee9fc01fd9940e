"""The ledger: durable state in SQLite (WAL), or in PostgreSQL (ledgerdb.py). The only place that
remembers.

One row per *version* of a file: a file rewritten under the same name after it was
hashed is a new row, so the old version's evidence is never confused with the new
one's. Every transition is a compare-and-set on the current state, committed (with
synchronous=FULL) before the caller goes on to acknowledge anything, and written to
the `events` table so each file's history can be replayed.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .core.fleet import decode_stats
from .core.lifecycle import (
    BINDS_NAME,
    COPIES_WRITTEN,
    FINAL,
    PROBLEMS,
    CopyState,
    Event,
    NameState,
    State,
    apply,
)
from .core.uplink import Post
from .errors import AgentIdTaken, LedgerUnreachable, LedgerUnwritable
from .groupcommit import CommitFailed, GroupCommit
from .ledgerdb import SQLITE, Dialect, LedgerConnectionLost, columns, connect_postgres, is_url, schema_lock, shown
from .nightbook import NightBook

SCHEMA_VERSION = 1


def _sql_list(values: Iterable[enum.Enum]) -> str:
    """An SQL list of enum values, for a query or an index (values are code, never input)."""
    return "(" + ", ".join(f"'{v.value}'" for v in values) + ")"


# events shown as "recent errors"; a partial index covers exactly these
_PROBLEM_EVENTS = _sql_list(PROBLEMS)
# a version's copies that another version relies on as it does: written, or being written or rewritten
_COUNTED_BY_OWNER = (CopyState.WRITTEN, CopyState.WRITING, CopyState.BAD, CopyState.LOST)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id           {ID},
    rule         TEXT NOT NULL,
    path         {BLOB} NOT NULL,      -- os.fsencode(absolute path): any byte sequence survives
    relpath      TEXT NOT NULL,      -- for people: undecodable bytes shown as \\x escapes
    version      {INT} NOT NULL,
    dev          {INT}, inode {INT}, size {INT}, mtime_ns {INT},
    blake3       TEXT, adler32 TEXT, md5 TEXT,
    scope        TEXT, name TEXT, dataset TEXT, metadata TEXT,
    lake_ref     TEXT,               -- what the lake calls our request for copies (a rule id)
    state        TEXT NOT NULL,
    resume_state TEXT,
    attempts     {INT} NOT NULL DEFAULT 0,
    next_at      {REAL} NOT NULL DEFAULT 0,
    reason       TEXT,
    priority     {INT} NOT NULL DEFAULT 0,
    first_seen   {REAL} NOT NULL,
    changed_at   {REAL} NOT NULL,      -- last time size/mtime/inode were seen to change
    updated_at   {REAL} NOT NULL,
    confirmed_at {REAL},
    deleted_at   {REAL},
    ctime_ns     {INT},
    claim_owner  TEXT,               -- a shared ledger: the agent whose step holds the row ...
    claim_until  {REAL},             -- ... until then (its lease; renewed while the step runs) ...
    claim_epoch  TEXT                -- ... in which run of that agent (a process under its id)
);
CREATE TABLE IF NOT EXISTS events (
    id {ID}, file_id {INT} NOT NULL, at {REAL} NOT NULL,
    from_state TEXT, to_state TEXT NOT NULL, event TEXT NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS replicas (
    file_id {INT} NOT NULL, location TEXT NOT NULL, url TEXT NOT NULL,
    size {INT}, adler32 TEXT, state TEXT NOT NULL, at {REAL} NOT NULL,
    PRIMARY KEY (file_id, location)
);
-- Who may write, and what content lies, under each lake name (scope:name). A name is reserved
-- (committed) before the first byte is written under it and bound to one content (blake3) when
-- its version is hashed: two files never share a URL, a temporary file or a counted copy unless
-- their bytes are the same. 'writing': `owner` writes its first copy, content not known yet;
-- 'bound': the name holds `blake3`; 'removing': `owner` removes a copy nobody else counts.
CREATE TABLE IF NOT EXISTS names (
    scope TEXT NOT NULL, name TEXT NOT NULL, owner {INT} NOT NULL, blake3 TEXT,
    state TEXT NOT NULL, at {REAL} NOT NULL,
    first_url TEXT,      -- 'writing': the one URL found empty when reserved, the first copy's
    PRIMARY KEY (scope, name)
);
-- The agents that share this ledger (several hosts on one buffer): who they are, when last heard of.
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid {INT}, version TEXT,
    started_at {REAL} NOT NULL, heartbeat_at {REAL} NOT NULL,
    place TEXT,          -- machine-id:state_dir of the process running under agent_id
    stats TEXT           -- JSON: what the agent did in its last heartbeat's interval (core/fleet.py)
);
CREATE TABLE IF NOT EXISTS notices (
    path {BLOB} PRIMARY KEY, rule TEXT NOT NULL, relpath TEXT NOT NULL, kind TEXT NOT NULL,
    detail TEXT NOT NULL, first_seen {REAL} NOT NULL, last_seen {REAL} NOT NULL, count {INT} NOT NULL
);
-- The nights of rules that close them (edge_agent/nights.py): one row per (rule, dataset) once a file
-- is hashed into it (or waits with an mtime in it); 'open' -> 'closing' (the lake calls under way) ->
-- 'closed' with its verdict. A dataset not 'open' takes no file: a late one goes to a dataset of its own.
CREATE TABLE IF NOT EXISTS nights (
    rule TEXT NOT NULL, dataset TEXT NOT NULL, night TEXT, ends_at {REAL},
    state TEXT NOT NULL, verdict TEXT, reasons TEXT, files {INT}, bytes {INT},
    late_of TEXT, manifest TEXT, opened_at {REAL} NOT NULL, closed_at {REAL},
    PRIMARY KEY (rule, dataset)
);
-- A shared ledger under a bandwidth cap: what each agent last posted of its use of the one uplink
-- (core/uplink.py works out its share from the others'). `at`: the database's clock, one for all hosts.
CREATE TABLE IF NOT EXISTS uplink (
    agent_id TEXT PRIMARY KEY, wants {INT} NOT NULL, held {INT} NOT NULL, rate {REAL} NOT NULL,
    share {REAL} NOT NULL, at {REAL} NOT NULL
);
"""

# indexes come after the migration, which may first have to add the columns they use
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS files_live_path ON files(rule, path)
    WHERE state NOT IN ('deleted', 'superseded');
CREATE INDEX IF NOT EXISTS files_due ON files(state, next_at);
-- (state, id): a page of one state's rows by id, without reading the other states' rows
CREATE INDEX IF NOT EXISTS files_state ON files(state);
-- due()'s order: without it, every dispatch sorts the whole backlog (a million rows: ~1 s each tick)
CREATE INDEX IF NOT EXISTS files_queue ON files(state, priority DESC, next_at);
CREATE INDEX IF NOT EXISTS files_name ON files(scope, name);
-- a new version's number (MAX(version) of the path, every state): without it each discovery reads
-- the whole table, and discovering a tree of a million files takes hours
CREATE INDEX IF NOT EXISTS files_versions ON files(rule, path, version);
CREATE INDEX IF NOT EXISTS events_file ON events(file_id);
-- a night's files (closing it; and the few not hashed yet, dataset NULL): not the whole table per night
CREATE INDEX IF NOT EXISTS files_dataset ON files(rule, dataset);
CREATE INDEX IF NOT EXISTS nights_state ON nights(state);
-- the names a version holds (each HASHED transition drops its other reservations; each ended version
-- is cleaned up): without it every one reads the whole names table, a row per name ever given
CREATE INDEX IF NOT EXISTS names_owner ON names(owner);
-- names mid-way (reserved, being removed) and first copies never registered: few, looked for at start
CREATE INDEX IF NOT EXISTS names_pending ON names(state) WHERE state != 'bound';
CREATE INDEX IF NOT EXISTS replicas_sent ON replicas(file_id) WHERE state = 'sent';
-- the files in flight per agent (a claim not given back): the fleet view and each agent's claims
-- count read only these few rows, not a million-row table per agent
CREATE INDEX IF NOT EXISTS files_claims ON files(claim_owner, state, claim_until) WHERE claim_until > 0;
-- partial: costs nothing on the happy path, spares the status page a scan of every event
CREATE INDEX IF NOT EXISTS events_problems ON events(id) WHERE event IN {problems};
""".format(problems=_PROBLEM_EVENTS)


@dataclass(frozen=True)
class _Here:
    """A row's place in the lifecycle, as lifecycle.apply() reads it."""
    state: State
    resume_state: State | None


@dataclass(frozen=True)
class Move:
    """One file's move in a group commit: from `expect`, by `event`, with its history detail and the
    columns it sets."""
    file_id: int
    expect: State
    event: Event
    detail: dict[str, Any] | None = None
    updates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WrittenCopy:
    """A copy the agent wrote (or found bad), as the ledger remembers it: where, what the storage
    holds, its state, and the history note that goes with it."""
    location: str
    url: str
    size: int | None
    adler32: str | None
    state: CopyState
    note: tuple[State, Event, dict[str, Any]] | None = None


class StaleTransition(Exception):
    """The row was not in the expected state: someone else moved it (or it was superseded)."""


class NameConflict(Exception):
    """The name asked for is held by another version (other content, or content not known yet)."""


@dataclass(frozen=True)
class NameHold:
    """What the ledger says of one lake name: who holds it, in which state, for which content."""
    owner: int
    state: NameState
    blake3: str | None
    owner_final: bool     # the owner version has ended (superseded or deleted)
    first_url: str | None = None   # 'writing': the URL of the first copy, found empty when reserved


@dataclass(frozen=True)
class FileRecord:
    """One version of one file, as the ledger holds it (a row of `files`)."""
    id: int
    rule: str
    path: bytes
    relpath: str
    version: int
    dev: int | None
    inode: int | None
    size: int | None
    mtime_ns: int | None
    blake3: str | None
    adler32: str | None
    md5: str | None
    scope: str | None
    name: str | None
    dataset: str | None
    metadata: str | None
    lake_ref: str | None
    state: State
    resume_state: State | None
    attempts: int
    next_at: float
    reason: str | None
    priority: int
    first_seen: float
    changed_at: float
    updated_at: float
    confirmed_at: float | None
    deleted_at: float | None
    # st_ctime_ns when hashed (nobody can set it back, unlike mtime); NULL in a row an older agent hashed.
    # A column _migrate adds to an older ledger, like every field here.
    ctime_ns: int | None = None
    # A shared ledger: the agent whose step holds this row, and until when (claim()).
    claim_owner: str | None = None
    claim_until: float | None = None
    claim_epoch: str | None = None     # which run of claim_owner (a restart, another host under its id)

    @property
    def fspath(self) -> str:
        return os.fsdecode(self.path)

    @property
    def did(self) -> str:
        return f"{self.scope}:{self.name}"

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.metadata) if self.metadata else {}

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["path"] = self.fspath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        d["state"] = self.state.value
        d["resume_state"] = self.resume_state.value if self.resume_state else None
        d["metadata"] = self.meta
        return d


_COLS = [f.name for f in fields(FileRecord)]
# Columns of `files` added after the first schema: what a ledger of an older agent is given.
_ADDED_COLUMNS = {"ctime_ns": "{INT}", "claim_owner": "TEXT", "claim_until": "{REAL}", "claim_epoch": "TEXT"}


def _row(r: Any) -> FileRecord:
    d = dict(r)
    d["state"] = State(d["state"])
    d["resume_state"] = State(d["resume_state"]) if d["resume_state"] else None
    # .get: a read-only look at an older agent's ledger may lack columns added since
    return FileRecord(**{k: d.get(k) for k in _COLS})


def display_path(path: bytes | str) -> str:
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def _is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, LedgerConnectionLost):
        return True     # PostgreSQL out of reach: like a full disk, new work waits until it answers
    state = getattr(exc, "sqlstate", None)
    if state:
        # PostgreSQL: insufficient resources (disk full, out of memory), connection exceptions, the
        # server shutting down, a read-only transaction (a standby)
        # (and 55P03 a lock waited for longer than lock_timeout, 25P03 a transaction the server
        # ended for idling: both say the ledger cannot be written now)
        return state[:2] in ("53", "08") or state.startswith("57P") or state in ("25006", "55P03", "25P03")
    code = getattr(exc, "sqlite_errorcode", None)
    # SQLITE_FULL, SQLITE_IOERR (and its extended codes), SQLITE_READONLY, SQLITE_CANTOPEN
    return code is not None and code & 0xFF in (13, 10, 8, 14)


def _held_by(agent: str, epoch: str | None) -> tuple[str, list[Any]]:
    """The SQL condition (and its arguments) of a row claimed by `agent` in run `epoch` (any run: None)."""
    if epoch is None:
        return "claim_owner = ?", [agent]
    return "claim_owner = ? AND claim_epoch = ?", [agent, epoch]


def _unwritable(where: str, exc: BaseException) -> LedgerUnwritable:
    unreachable = isinstance(exc, LedgerConnectionLost) or str(getattr(exc, "sqlstate", "") or "").startswith("08")
    return (LedgerUnreachable if unreachable else LedgerUnwritable)(f"the ledger {where} cannot be written: {exc}")


class LedgerDamaged(LedgerUnwritable):
    """The ledger can no longer be trusted: SQLite found it corrupt, or its file was deleted or
    replaced while the agent runs. Like a full disk it stops new work; unlike one it does not heal."""


def _is_corrupt(exc: BaseException) -> bool:
    if getattr(exc, "sqlstate", None) in ("XX001", "XX002"):
        return True       # PostgreSQL: data corrupted, index corrupted
    code = getattr(exc, "sqlite_errorcode", None)
    # SQLITE_CORRUPT, SQLITE_NOTADB
    return code is not None and code & 0xFF in (11, 26)


class Ledger(NightBook):
    """The agent's durable memory: every file version, its state and history, the names it owns and
    the notices for operators, in SQLite (a path: the embedded default) or PostgreSQL (a
    postgresql:// URL, see ledgerdb.py). A transition is committed before its effect is acknowledged."""
    def __init__(self, path: str | os.PathLike[str], clock: Any = time.time, synchronous: str = "full",
                 readonly: bool = False, password: str | None = None, connect_timeout: float = 10.0,
                 lease_clock: str = "server") -> None:
        self._url = str(path) if is_url(path) else None
        self.path = Path(path) if self._url is None else None
        self.where = shown(self._url) if self._url is not None else str(self.path)
        self._password = password
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._lease_by_caller = lease_clock == "caller"   # tests with a fake clock on PostgreSQL
        self._lock = threading.RLock()       # the write connection
        self._readers_lock = threading.Lock()
        self._idle_readers: list[Any] = []   # read connections not in use
        self._all_readers: list[Any] = []
        self.damage: str | None = None     # sticky: see probe()
        self._opened: tuple[int, int] | None = None   # (st_dev, st_ino) of the file opened for writing
        self._dialect: Dialect = SQLITE
        self._readonly = readonly
        if self._url is not None:
            try:
                self._db, self._dialect = connect_postgres(self._url, password, connect_timeout, readonly)
            except LedgerConnectionLost as exc:
                raise _unwritable(self.where, exc) from None
            if readonly:
                self._writes = GroupCommit(self._db, self._lock, begin=self._dialect.begin,
                                           errors=self._dialect.errors)
                return
            self._open(synchronous)
            return
        assert self.path is not None
        if readonly:
            # for `status` and `files` run by an operator who may only read the state directory
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=30)
            try:
                self._db.execute("SELECT COUNT(*) FROM meta").fetchone()
            except sqlite3.OperationalError:
                # WAL readers need write access to the -shm file; without it the database file is
                # read as it is (commits not yet checkpointed by the agent are not seen)
                self._db.close()
                self._db = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, check_same_thread=False,
                                           isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._writes = GroupCommit(self._db, self._lock)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transition survives power loss, not only kill -9. NORMAL (WAL) survives
            # kill -9 but may lose the last transitions on power loss; every step is idempotent and
            # re-checked, so that repeats work but loses nothing. See settings.ledger_synchronous.
            if synchronous not in ("full", "normal"):
                raise ValueError(synchronous)
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._open(synchronous)
        except sqlite3.OperationalError as exc:
            if _is_storage_error(exc):
                raise _unwritable(self.where, exc) from exc
            raise
        st = os.stat(self.path)
        self._opened = (st.st_dev, st.st_ino)

    def _open(self, synchronous: str) -> None:
        """The schema made or brought up to date (both databases; PostgreSQL commits every write),
        under the ledger's lock (agents starting at once)."""
        with schema_lock(self._db, self._dialect):
            self._make_schema()
        self._writes = GroupCommit(self._db, self._lock, begin=self._dialect.begin, errors=self._dialect.errors)

    def _make_schema(self) -> None:
        self._db.executescript(self._dialect.ddl(_SCHEMA))
        self._migrate()
        # the problem events changed since the index was made: a query no longer matching its WHERE
        # would read every event (the index's definition kept in meta: both databases compare it)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'events_problems'").fetchone()
        if row is not None and row[0] != _PROBLEM_EVENTS:
            self._db.execute("DROP INDEX IF EXISTS events_problems")
        elif row is None and self._dialect.name == "sqlite":
            old = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'events_problems'").fetchone()
            if old is not None and _PROBLEM_EVENTS not in old[0]:
                self._db.execute("DROP INDEX events_problems")
        if self._dialect.name == "sqlite" or not self._indexes_made():
            # (PostgreSQL: CREATE INDEX IF NOT EXISTS waits for every open writer, even when it exists)
            self._db.executescript(_INDEXES)
        self._db.execute("INSERT INTO meta VALUES ('events_problems', ?) ON CONFLICT (key) DO UPDATE "
                         "SET value = excluded.value", (_PROBLEM_EVENTS,))
        self._db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
                         (str(SCHEMA_VERSION),))

    def _indexes_made(self) -> bool:
        """PostgreSQL: does the schema hold every index of _INDEXES already?"""
        wanted = set(re.findall(r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)", _INDEXES))
        have = {r[0] for r in self._db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}
        return wanted <= have

    def _migrate(self) -> None:
        """A ledger written by an older agent gains the columns added since (all nullable)."""
        have = columns(self._db, self._dialect, "files")
        for col in _COLS:
            if col not in have:
                # the columns added since the first schema, with their types (an older SQLite ledger
                # took the first of them without one)
                self._db.execute(f"ALTER TABLE files ADD COLUMN {col} {self._dialect.ddl(_ADDED_COLUMNS.get(col, ''))}")
        if "first_url" not in columns(self._db, self._dialect, "names"):
            self._db.execute("ALTER TABLE names ADD COLUMN first_url TEXT")
        for col in ("place", "stats"):
            if col not in columns(self._db, self._dialect, "agents"):
                self._db.execute(f"ALTER TABLE agents ADD COLUMN {col} TEXT")
        if self._db.execute("SELECT 1 FROM meta WHERE key = 'names_filled'").fetchone() is None:
            # a ledger from before the names table: every name a hashed version was given is bound
            # to that version's content (a live or delivered version before a superseded one)
            for statement in self._dialect.begin:
                self._db.execute(statement)
            self._db.execute(
                "INSERT INTO names (scope, name, owner, blake3, state, at) "
                "SELECT scope, name, id, blake3, 'bound', updated_at FROM files "
                "WHERE scope IS NOT NULL AND name IS NOT NULL AND blake3 IS NOT NULL "
                "ORDER BY state = 'superseded', id ON CONFLICT (scope, name) DO NOTHING")
            self._db.execute("INSERT INTO meta VALUES ('names_filled', '1') ON CONFLICT (key) DO NOTHING")
            self._db.execute("COMMIT")

    def close(self) -> None:
        """The database connection is closed."""
        with self._lock:
            self._writes.close_open()
            self._db.close()
        with self._readers_lock:
            for reader in self._all_readers:
                reader.close()
            self._all_readers, self._idle_readers = [], []

    def meta(self, key: str) -> str | None:
        """The value stored under `key` in the meta table (None if none)."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """After this, meta `key` holds `value`."""
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                       (key, value))

    def probe(self) -> str | None:
        """Why this ledger can no longer be trusted, or None. Cheap on a ledger of any size (a stat
        and a one-row read, no integrity check), for calling every few seconds: the file this
        connection writes was deleted or replaced (every later write would go where no restart
        finds it), or SQLite reported it corrupt, here or on any read or write before. Sticky.
        (PostgreSQL: a lost connection is not damage; the next write connects again.)"""
        if self.damage is None and self.path is not None:
            try:
                st = os.stat(self.path)
                if self._opened is not None and (st.st_dev, st.st_ino) != self._opened:
                    self.damage = "replaced by another file while the agent runs"
            except FileNotFoundError:
                self.damage = "deleted while the agent runs"
        if self.damage is None:
            try:
                self._query("SELECT value FROM meta WHERE key = 'schema_version'")
            except LedgerDamaged:
                pass
            except LedgerUnwritable:
                pass       # the server is out of reach: the runner's write probe tells when it is back
        return None if self.damage is None else f"the ledger {self.where} cannot be trusted: {self.damage}"

    def _damaged(self, exc: BaseException) -> LedgerDamaged:
        self.damage = self.damage or str(exc)
        return LedgerDamaged(f"the ledger {self.where} cannot be trusted: {exc}")

    # ------------------------------------------------------------ plumbing
    def _writer_back(self) -> None:
        """PostgreSQL: a write connection the server dropped is replaced (with the lock held, so no
        group is open on it); LedgerUnwritable while the server does not answer."""
        if self._url is None or not self._db.broken:
            return
        with self._lock:
            if not self._db.broken:
                return
            try:
                db, _ = connect_postgres(self._url, self._password, self._connect_timeout, self._readonly)
            except LedgerConnectionLost as exc:
                raise _unwritable(self.where, exc) from None
            old, self._db = self._db, db
            self._writes = GroupCommit(db, self._lock, begin=self._dialect.begin, errors=self._dialect.errors)
            try:
                old.close()
            except Exception:  # noqa: BLE001 - it is gone already
                pass

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction, shared with the writers queued beside it (groupcommit.py): returns
        once committed. The database's errors become LedgerDamaged or LedgerUnwritable where they
        say the ledger is corrupt or cannot be written (a full disk, a server out of reach); a
        body's own errors pass."""
        self._writer_back()
        try:
            with self._writes.transaction() as db:
                yield db
        except CommitFailed as exc:
            raise (self._damaged(exc.cause) if _is_corrupt(exc.cause) else _unwritable(self.where, exc.cause)) from exc
        except self._dialect.errors as exc:
            if _is_corrupt(exc):
                raise self._damaged(exc) from exc
            if _is_storage_error(exc):
                raise _unwritable(self.where, exc) from exc
            raise

    def _connect_reader(self) -> Any:
        if self._url is not None:
            try:
                return connect_postgres(self._url, self._password, self._connect_timeout, readonly=True)[0]
            except LedgerConnectionLost as exc:
                raise _unwritable(self.where, exc) from None
        assert self.path is not None
        # mode=rw: a ledger deleted while the agent runs is not created anew, empty, by a
        # reader (probe() reports the deletion; reads fail meanwhile)
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, check_same_thread=False,
                             isolation_level=None, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    @contextlib.contextmanager
    def _reader(self) -> Iterator[Any]:
        """A read connection, taken from the idle ones (or opened) and given back: reads see only
        what is committed (never a group's writes before its COMMIT) and wait neither for the
        writers (WAL) nor for each other. Pooled, not one per thread: the status server runs a
        thread per request, and a connection per thread would leak one per scrape."""
        with self._readers_lock:
            db = self._idle_readers.pop() if self._idle_readers else None
        if db is None:
            db = self._connect_reader()
            with self._readers_lock:
                self._all_readers.append(db)
        try:
            yield db
        finally:
            with self._readers_lock:
                if getattr(db, "broken", False):
                    self._all_readers.remove(db)      # PostgreSQL dropped it: a new one next time
                else:
                    self._idle_readers.append(db)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        # committed data only (what is read may lead to an effect outside the ledger), except for a
        # writer reading inside its own transaction
        use: contextlib.AbstractContextManager[Any]
        if self._readonly or self._writes.inside():
            use = self._writer_connection()
        else:
            use = self._idle_writer() or self._reader()
        with use as db:
            try:
                return db.execute(sql, args).fetchall()
            except self._dialect.errors as exc:
                if _is_corrupt(exc):
                    raise self._damaged(exc) from exc
                if isinstance(exc, LedgerConnectionLost):
                    raise _unwritable(self.where, exc) from exc
                raise

    @contextlib.contextmanager
    def _writer_connection(self) -> Iterator[Any]:
        with self._lock:
            yield self._db

    def _idle_writer(self) -> contextlib.AbstractContextManager[Any] | None:
        """The write connection, for a read, when nobody writes: no transaction open, so it shows
        only what is committed, and its page cache is warm (another connection's cache is dropped
        whenever the database changed: a rescan that reads and writes in turn, through two
        connections, took half as long again). None when it is busy or a group is open."""
        if not self._lock.acquire(blocking=False):
            return None
        if self._db.in_transaction or getattr(self._db, "broken", False):
            self._lock.release()
            return None

        @contextlib.contextmanager
        def held() -> Iterator[Any]:
            try:
                yield self._db
            finally:
                self._lock.release()
        return held()

    # ------------------------------------------------------------ reading
    def get(self, file_id: int) -> FileRecord:
        """The row of `file_id` (KeyError if there is none)."""
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise KeyError(file_id)
        return _row(rows[0])

    def live(self, rule: str, path: bytes) -> FileRecord | None:
        """The live (neither deleted nor superseded) version of `path` under `rule`, or None."""
        rows = self._query("SELECT * FROM files WHERE rule = ? AND path = ? AND state NOT IN "
                           "('deleted', 'superseded')", (rule, path))
        return _row(rows[0]) if rows else None

    def versions(self, rule: str, path: bytes, limit: int = 100) -> list[FileRecord]:
        """Every version of `path` under `rule`, ended ones too, oldest first: the newest `limit` of
        them, read through the (rule, path, version) index."""
        rows = self._query("SELECT * FROM files WHERE rule = ? AND path = ? ORDER BY version DESC, id DESC LIMIT ?",
                           (rule, path, limit))
        return [_row(r) for r in reversed(rows)]

    def live_many(self, rule: str, paths: Sequence[bytes]) -> dict[bytes, FileRecord]:
        """The live rows of some paths (a rescan's batch), through the live-path index."""
        out: dict[bytes, FileRecord] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            rows = self._query(f"SELECT * FROM files WHERE rule = ? AND path IN ({','.join('?' * len(chunk))}) "
                               "AND state NOT IN ('deleted', 'superseded')", [rule, *chunk])
            out.update((r["path"], _row(r)) for r in rows)
        return out

    def live_stats(self, rule: str, paths: Sequence[bytes]) -> dict[bytes, tuple[int, int | None, int | None,
                                                                           int | None]]:
        """(id, inode, size, mtime_ns) of the live rows of some paths: what a rescan compares, without
        building a FileRecord per file (that was half of a million-file rescan)."""
        out: dict[bytes, tuple[int, int | None, int | None, int | None]] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            rows = self._query(f"SELECT path, id, inode, size, mtime_ns FROM files WHERE rule = ? AND path IN "
                               f"({','.join('?' * len(chunk))}) AND state NOT IN ('deleted', 'superseded')",
                               [rule, *chunk])
            out.update((r[0], (r[1], r[2], r[3], r[4])) for r in rows)
        return out

    def unhashed_paths(self, states: Iterable[State], rule: str, after_id: int,
                       limit: int) -> list[tuple[int, bytes]]:
        """(id, path) of rows in `states` not hashed yet, by id, one page: the rescan's check for
        vanished files, without building a FileRecord per file."""
        rows: list[tuple[int, bytes]] = []
        for s in states:
            rows += [(r[0], r[1]) for r in self._query(
                f"SELECT id, path, blake3 FROM files {self._dialect.hint('files_state')} WHERE state = ? AND id > ? AND rule = ? "
                "ORDER BY id LIMIT ?", [s.value, after_id, rule, limit]) if r[2] is None]
        rows.sort()
        return rows[:limit]

    def live_paths(self, rule: str) -> dict[bytes, FileRecord]:
        """Every live version under `rule`, by path."""
        rows = self._query("SELECT * FROM files WHERE rule = ? AND state NOT IN ('deleted', 'superseded')",
                           (rule,))
        return {r["path"]: _row(r) for r in rows}

    def due(self, states: Iterable[State], now: float, limit: int,
            exclude: Iterable[int] = ()) -> list[FileRecord]:
        """Rows whose next step may run now, highest priority first, oldest first."""
        ex = list(exclude)
        # one state at a time, read in the queue index's order: the top `limit` of each, merged, is
        # the top `limit` of all, without SQLite sorting a backlog of a million rows at every dispatch
        rows: list[Any] = []
        for s in states:
            sql = (f"SELECT * FROM files {self._dialect.hint('files_queue')} WHERE state = ? AND next_at <= ?"
                   + (f" AND id NOT IN ({','.join('?' * len(ex))})" if ex else "")
                   + " ORDER BY priority DESC, next_at, id LIMIT ?")
            rows += self._query(sql, [s.value, now, *ex, limit])
        rows.sort(key=lambda r: (-r["priority"], r["next_at"], r["id"]))
        return [_row(r) for r in rows[:limit]]

    # ------------------------------------------------------------ claims (a ledger shared by agents)
    def claim(self, agent: str, states: Iterable[State], now: float, limit: int, lease_s: float,
              exclude: Iterable[int] = (), rules: Sequence[str] | None = None,
              epoch: str | None = None) -> list[FileRecord]:
        """Up to `limit` rows whose next step may run now (due()'s order) and that no other agent
        holds (no claim, or one whose lease ran out), claimed by `agent` until now + lease_s, in
        one transaction, under the ledger's write lock (both databases: one writer at a time), so
        two agents never hold one row. Rows `agent` holds already are claimed again (its own, from
        before a restart); those its steps are working on go in `exclude`. `rules`: only files of
        these rules (an agent claims nothing it would not work on). `epoch`: this run of `agent`;
        rows of another run under the same id are its own only once their lease ran out or were
        given back (that run may be a process stalled elsewhere; see enrol)."""
        ex = list(exclude)
        mine, mine_args = _held_by(agent, epoch)
        with self._tx() as db:
            lease_now = self._lease_now(db, now)
            rows: list[Any] = []
            for s in states:
                rows += db.execute(
                    f"SELECT id, priority, next_at FROM files {self._dialect.hint('files_queue')} "
                    f"WHERE state = ? AND next_at <= ? AND (claim_owner IS NULL OR ({mine}) OR claim_until < ?)"
                    + (f" AND id NOT IN ({','.join('?' * len(ex))})" if ex else "")
                    + (f" AND rule IN ({','.join('?' * len(rules))})" if rules is not None else "")
                    + " ORDER BY priority DESC, next_at, id LIMIT ?",
                    [s.value, now, *mine_args, lease_now, *ex, *(rules or ()), limit]).fetchall()
            rows.sort(key=lambda r: (-r[1], r[2], r[0]))
            ids = [r[0] for r in rows[:limit]]
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                db.execute("UPDATE files SET claim_owner = ?, claim_until = ?, claim_epoch = ? "
                           f"WHERE id IN ({','.join('?' * len(part))})", [agent, lease_now + lease_s, epoch, *part])
        return self.get_many(ids)

    def _lease_now(self, db: Any, now: float) -> float:
        """The time leases are reckoned in: the database server's clock for a PostgreSQL ledger
        (agents on several hosts, whose clocks may differ or step, compare one clock), the caller's
        `now` for SQLite (one host) or where the ledger was opened with lease_clock="caller"."""
        if self._dialect.name == "sqlite" or self._lease_by_caller:
            return now
        return float(db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()[0])

    def holds(self, agent: str, epoch: str | None, file_id: int, now: float, margin_s: float) -> bool:
        """Does `agent` (run `epoch`) hold `file_id` with at least `margin_s` of its lease left, on the
        lease clock? Asked right before the effect that matters most (the local file unlinked): it
        also sees a lease the server's clock ended early by stepping forward."""
        rows = self._query("SELECT claim_owner, claim_epoch, claim_until FROM files WHERE id = ?", (file_id,))
        if not rows:
            return False
        owner, run, until = rows[0][0], rows[0][1], rows[0][2]
        return (owner == agent and (epoch is None or run == epoch)
                and (until or 0) - self.lease_clock(now) > margin_s)

    def arrivals(self, rule: str, after_id: int, since: float,
                 limit: int = 10_000) -> list[tuple[int, float, float]]:
        """(id, first_seen, written) of the versions of `rule` discovered after row `after_id` and at
        or after `since`, newest first (read backwards along the primary key: what came last costs
        least). `written`: the file's mtime, never later than its discovery."""
        return [(int(r[0]), float(r[1]), min(float(r[1]), r[2] / 1e9) if r[2] is not None else float(r[1]))
                for r in self._query("SELECT id, first_seen, mtime_ns FROM files WHERE id > ? AND rule = ? AND "
                                     "first_seen >= ? ORDER BY id DESC LIMIT ?", (after_id, rule, since, limit))]

    def last_arrival(self, rule: str) -> tuple[int, float] | None:
        """(id, first_seen) of the last version of `rule` discovered, or None."""
        rows = self._query("SELECT id, first_seen FROM files WHERE rule = ? ORDER BY id DESC LIMIT 1", (rule,))
        return (int(rows[0][0]), float(rows[0][1])) if rows else None

    def lease_clock(self, now: float) -> float:
        """The time now as leases and heartbeats are reckoned (see _lease_now): for readers that
        compare with them (the fleet view)."""
        if self._dialect.name == "sqlite" or self._lease_by_caller:
            return now
        return float(self._query("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")[0][0])

    def renew(self, agent: str, file_ids: Sequence[int], lease_s: float, now: float,
              epoch: str | None = None) -> set[int]:
        """The claims `agent` (in run `epoch`) still holds on `file_ids`, extended by `lease_s` from
        now (the lease clock: see _lease_now); returns their ids. A claim another agent (or run)
        took after its lease ran out is not renewed (that step is fenced), nor one given back."""
        held: set[int] = set()
        ids = list(file_ids)
        mine, mine_args = _held_by(agent, epoch)
        with self._tx() as db:
            until = self._lease_now(db, now) + lease_s
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                marks = ",".join("?" * len(part))
                held.update(r[0] for r in db.execute(
                    f"SELECT id FROM files WHERE {mine} AND claim_until > 0 AND id IN ({marks})",
                    [*mine_args, *part]).fetchall())
                db.execute(f"UPDATE files SET claim_until = ? WHERE {mine} AND claim_until > 0 AND id IN ({marks})",
                           [until, *mine_args, *part])
        return held

    def release(self, agent: str, file_ids: Sequence[int], epoch: str | None = None) -> None:
        """`agent`'s claims on `file_ids` given up (its step ended, or it was never handed to one):
        any agent may claim them now. The row stays marked as `agent`'s until then (its lease ended:
        claim_until 0), so that a step of another agent that stalled past its lease before `agent`
        took the row over still commits nothing (were the mark gone, the row would look nobody's)."""
        ids = list(file_ids)
        if not ids:
            return
        mine, mine_args = _held_by(agent, epoch)
        with self._tx() as db:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                db.execute(f"UPDATE files SET claim_until = 0 WHERE {mine} "
                           f"AND id IN ({','.join('?' * len(part))})", [*mine_args, *part])

    def enrol(self, agent: str, place: str, host: str, pid: int, version: str, now: float,
              fresh_s: float) -> None:
        """`agent` starts at `place` (machine-id:state_dir). AgentIdTaken if another place ran under
        that id and heartbeated within `fresh_s` (two agents under one id would each take the
        other's claims for their own); one gone silent for longer is taken over."""
        with self._tx() as db:
            at = self._lease_now(db, now)
            row = db.execute("SELECT place, host, heartbeat_at FROM agents WHERE agent_id = ?", (agent,)).fetchone()
            if row is not None and row[0] not in (None, place) and at - row[2] < fresh_s:
                raise AgentIdTaken(f"ledger.agent_id {agent!r}: another edge-agent runs under this id "
                                   f"(host {row[1]}, {row[0]}, last heartbeat {at - row[2]:.0f}s ago); "
                                   "give each agent an id of its own")
            if row is not None and row[0] == place:
                # the previous run at this very place (machine and state_dir, whose lock this process
                # holds) is dead: its claims are given back at once rather than waited out
                db.execute("UPDATE files SET claim_until = 0 WHERE claim_owner = ? AND claim_until > 0", (agent,))
            db.execute("INSERT INTO agents (agent_id, host, pid, version, started_at, heartbeat_at, place) "
                       "VALUES (?,?,?,?,?,?,?) ON CONFLICT (agent_id) DO UPDATE SET host = excluded.host, "
                       "pid = excluded.pid, version = excluded.version, started_at = excluded.started_at, "
                       "heartbeat_at = excluded.heartbeat_at, place = excluded.place",
                       (agent, host, pid, version, at, at, place))

    def heartbeat(self, agent: str, host: str, pid: int, version: str, now: float,
                  stats: dict[str, Any] | None = None, *, place: str | None = None) -> bool:
        """`agent` is alive now (the fleet's view; a dead agent's claims run out by their leases),
        with `stats`, what it did since its last heartbeat (core/fleet.py; None: nothing known).
        False if another place has enrolled under `agent` since (this process must stop)."""
        with self._tx() as db:
            at = self._lease_now(db, now)
            row = db.execute("SELECT place FROM agents WHERE agent_id = ?", (agent,)).fetchone()
            if row is not None and place is not None and row[0] not in (None, place):
                return False
            db.execute("INSERT INTO agents (agent_id, host, pid, version, started_at, heartbeat_at, place, stats) "
                       "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (agent_id) DO UPDATE SET host = excluded.host, "
                       "pid = excluded.pid, version = excluded.version, heartbeat_at = excluded.heartbeat_at, "
                       "place = COALESCE(excluded.place, agents.place), stats = excluded.stats",
                       (agent, host, pid, version, at, at, place, None if stats is None else json.dumps(stats)))
        return True

    def fleet_id(self) -> str:
        """This ledger's own id (made at the first call, kept in meta): what the buffers a fleet shares
        record, so that an agent on another ledger is refused there."""
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES ('fleet_id', ?) ON CONFLICT (key) DO NOTHING",
                       (uuid.uuid4().hex,))
            return str(db.execute("SELECT value FROM meta WHERE key = 'fleet_id'").fetchone()[0])

    def agents(self) -> list[dict[str, Any]]:
        """Every agent that ever used this ledger, with its claims held now, its last heartbeat and
        the figures it sent with it (`stats`, decoded; {} when none)."""
        # a.*: a read-only look at the ledger of an older agent may lack columns added since
        rows = self._query("SELECT a.*, (SELECT COUNT(*) FROM files f WHERE f.claim_owner = a.agent_id "
                           "AND f.claim_until > 0) AS claims FROM agents a ORDER BY a.agent_id")
        return [{**dict(r), "stats": decode_stats(dict(r).get("stats"))} for r in rows]

    def in_flight(self, now: float, per_agent: int = 10) -> dict[str, dict[str, Any]]:
        """The files in flight per agent: rows claimed and not given back (claim_until > 0, whether
        the lease still runs at `now` or not), by holder: `claims`, `expired` (leases run out: a
        silent agent's files, waiting for another to take them), `by_state`, and `files`, the first
        `per_agent` by lease end (id, rule, path, state, size, claim_until). Reads only the claimed
        rows (files_claims), however large the ledger."""
        out: dict[str, dict[str, Any]] = {}
        for owner, state, n, expired in self._query(
                "SELECT claim_owner, state, COUNT(*), SUM(CASE WHEN claim_until < ? THEN 1 ELSE 0 END) "
                "FROM files WHERE claim_until > 0 AND claim_owner IS NOT NULL GROUP BY claim_owner, state",
                (now,)):
            h = out.setdefault(owner, {"claims": 0, "expired": 0, "by_state": {}, "files": []})
            h["claims"] += int(n)
            h["expired"] += int(expired)      # PostgreSQL's SUM is a numeric
            h["by_state"][state] = int(n)
        for owner, h in out.items():
            h["files"] = [{"file_id": r[0], "rule": r[1], "path": r[2], "state": r[3], "size": r[4],
                           "claim_until": r[5]} for r in self._query(
                "SELECT id, rule, relpath, state, size, claim_until FROM files WHERE claim_owner = ? "
                "AND claim_until > 0 ORDER BY claim_until, id LIMIT ?", (owner, per_agent))]
        return out

    def in_states(self, states: Iterable[State], rule: str | None = None, after_id: int = 0,
                  limit: int | None = None) -> list[FileRecord]:
        """Rows in `states` by id; `after_id` + `limit` read a large backlog one page at a time."""
        # one state at a time through (state, id), merged: a page costs its own rows, not a sort
        # of every row in those states (a million: a second per page)
        rows: list[Any] = []
        for s in states:
            sql = f"SELECT * FROM files {self._dialect.hint('files_state')} WHERE state = ? AND id > ?"
            args: list[Any] = [s.value, after_id]
            if rule:
                sql += " AND rule = ?"
                args.append(rule)
            sql += " ORDER BY id"
            if limit is not None:
                sql += " LIMIT ?"
                args.append(limit)
            rows += self._query(sql, args)
        rows.sort(key=lambda r: r["id"])
        return [_row(r) for r in (rows if limit is None else rows[:limit])]

    def ids_in_state(self, ids: Iterable[int], state: State) -> set[int]:
        """Which of `ids` are still in `state` (without reading their rows)."""
        out: set[int] = set()
        ids = list(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self._query(f"SELECT id FROM files WHERE state = ? AND id IN ({','.join('?' * len(chunk))})",
                               [state.value, *chunk])
            out.update(r[0] for r in rows)
        return out

    def find(self, needle: str, limit: int = 50) -> list[FileRecord]:
        """Rows by id, DID name or a piece of the relative path."""
        if needle.isdigit():
            rows = self._query("SELECT * FROM files WHERE id = ?", (int(needle),))
        else:
            like = f"%{needle}%"
            op = "ILIKE" if self._dialect.name == "postgresql" else "LIKE"   # SQLite's LIKE ignores case
            rows = self._query(f"SELECT * FROM files WHERE relpath {op} ? OR name {op} ? ORDER BY id DESC "
                               "LIMIT ?", (like, like, limit))
        return [_row(r) for r in rows]

    def recent(self, limit: int = 50, state: State | None = None) -> list[FileRecord]:
        """The last `limit` rows changed (in `state` only, if given), newest first."""
        if state:
            rows = self._query("SELECT * FROM files WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
                               (state.value, limit))
        else:
            rows = self._query("SELECT * FROM files ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [_row(r) for r in rows]

    def history(self, file_id: int) -> list[dict[str, Any]]:
        """Every event of `file_id`, oldest first, with its detail decoded."""
        rows = self._query("SELECT at, from_state, to_state, event, detail FROM events WHERE file_id = ? "
                           "ORDER BY id", (file_id,))
        return [{**dict(r), "detail": json.loads(r["detail"]) if r["detail"] else None} for r in rows]

    def counts(self) -> list[tuple[str, str, int, int]]:
        """(rule, state, files, bytes) for every non-empty combination."""
        rows = self._query("SELECT rule, state, COUNT(*), COALESCE(SUM(size), 0) FROM files GROUP BY rule, state")
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in rows]   # PostgreSQL's SUM is a numeric

    def oldest_unconfirmed(self) -> FileRecord | None:
        """The oldest file still on its way; quarantined files wait for a person and are reported
        (and alerted on) apart, so that one of them does not hide a stalled pipeline behind it."""
        rows = self._query("SELECT * FROM files WHERE state NOT IN "
                           "('confirmed', 'deleted', 'superseded', 'quarantined') "
                           "ORDER BY first_seen LIMIT 1")
        return _row(rows[0]) if rows else None

    def name_hold(self, scope: str, name: str) -> NameHold | None:
        """Who holds scope:name, or None if no version was ever given it."""
        rows = self._query("SELECT n.owner, n.state, n.blake3, f.state, n.first_url FROM names n LEFT JOIN files f "
                           "ON f.id = n.owner WHERE n.scope = ? AND n.name = ?", (scope, name))
        if not rows:
            return None
        owner, state, blake3, owner_state, first_url = rows[0]
        return NameHold(owner, NameState(state), blake3, owner_state is None or State(owner_state) in FINAL, first_url)

    def reserve_name(self, scope: str, name: str, file_id: int, first_url: str | None = None) -> bool:
        """Reserve a name nobody holds for `file_id`'s first copy (to be written at `first_url`, found
        empty), committed before any byte is written under it. True if the name is now this
        version's to write (also when it already was: a step repeated after a crash); False if
        another version holds it."""
        with self._tx() as db:
            row = db.execute("SELECT owner, state FROM names WHERE scope = ? AND name = ?",
                             (scope, name)).fetchone()
            if row is not None:
                return bool(row[0] == file_id and row[1] == NameState.WRITING)
            db.execute("INSERT INTO names (scope, name, owner, blake3, state, at, first_url) "
                       f"VALUES (?,?,?,NULL,'{NameState.WRITING.value}',?,?)", (scope, name, file_id, self._clock(), first_url))
            return True

    def claim_writer(self, scope: str, name: str, file_id: int) -> int:
        """Who writes the copies under scope:name now: its owner while that version is still at work;
        a version with the same bytes (sharing the name) takes it over once the owner has ended or
        waits for a person (quarantined). Two versions never write one URL at the same time."""
        with self._tx() as db:
            row = db.execute("SELECT n.owner, f.state FROM names n LEFT JOIN files f ON f.id = n.owner "
                             f"WHERE n.scope = ? AND n.name = ? AND n.state = '{NameState.BOUND.value}'", (scope, name)).fetchone()
            if row is None or row[0] == file_id:
                return file_id
            if row[1] is None or row[1] in ("superseded", "deleted", "quarantined"):
                db.execute("UPDATE names SET owner = ?, at = ? WHERE scope = ? AND name = ?",
                           (file_id, self._clock(), scope, name))
                return file_id
            return int(row[0])

    def _bind_name(self, db: Any, file_id: int, scope: str, name: str, blake3: str) -> None:
        """Bind scope:name to a hashed version's content, in the transaction of its transition.
        Raises NameConflict if another version holds it with other (or not yet known) content."""
        row = db.execute("SELECT owner, state, blake3 FROM names WHERE scope = ? AND name = ?",
                         (scope, name)).fetchone()
        if row is None:
            db.execute(f"INSERT INTO names (scope, name, owner, blake3, state, at) VALUES (?,?,?,?,'{NameState.BOUND.value}',?)",
                       (scope, name, file_id, blake3, self._clock()))
        elif row[0] == file_id and row[1] == NameState.WRITING:
            db.execute(f"UPDATE names SET blake3 = ?, state = '{NameState.BOUND.value}', first_url = NULL, at = ? "
                       "WHERE scope = ? AND name = ?",
                       (blake3, self._clock(), scope, name))
        elif not (row[1] == NameState.BOUND and row[2] == blake3):
            raise NameConflict(f"{scope}:{name} is held by file {row[0]} ({row[1]})")

    def drop_reservation(self, scope: str, name: str, file_id: int) -> None:
        """Give up a reservation whose content was never bound (the first read failed and the
        copy it may have left was removed): the name is free again."""
        with self._tx() as db:
            db.execute(f"DELETE FROM names WHERE scope = ? AND name = ? AND owner = ? AND state = '{NameState.WRITING.value}'",
                       (scope, name, file_id))

    def begin_removal(self, scope: str, name: str, file_id: int) -> bool:
        """May `file_id` remove the copies it wrote under scope:name? Only while it owns the name and
        no other version that has not ended counts the name (one that was deleted locally relies on
        it). True: the name is marked 'removing' (nobody takes it until finish_removal). False: the
        copies stay and the name passes to a version that counts it."""
        with self._tx() as db:
            row = db.execute("SELECT owner, state FROM names WHERE scope = ? AND name = ?",
                             (scope, name)).fetchone()
            if row is None or row[0] != file_id:
                return False
            if row[1] == NameState.REMOVING:
                return True
            # a version that ended after it was confirmed, or after it wrote or counted a copy of
            # the name, relies on those copies as much as a live one: the lake lists them for it
            other = db.execute(
                "SELECT id FROM files f WHERE scope = ? AND name = ? AND id != ? AND (state != 'superseded' "
                "OR confirmed_at IS NOT NULL OR EXISTS (SELECT 1 FROM replicas r WHERE r.file_id = f.id "
                f"AND r.state IN {_sql_list(_COUNTED_BY_OWNER)})) "
                "ORDER BY state = 'deleted' DESC, id LIMIT 1", (scope, name, file_id)).fetchone()
            if other is not None:
                db.execute("UPDATE names SET owner = ?, at = ? WHERE scope = ? AND name = ?",
                           (other[0], self._clock(), scope, name))
                return False
            db.execute(f"UPDATE names SET state = '{NameState.REMOVING.value}', at = ? WHERE scope = ? AND name = ?",
                       (self._clock(), scope, name))
            return True

    def removing_by(self, scope: str, name: str, file_id: int) -> bool:
        """Is scope:name still being removed by `file_id` (begin_removal)? Asked right before each
        copy is removed: another agent may have finished the removal meanwhile, and a new version
        taken the free name and written its own copy at the same URL."""
        rows = self._query("SELECT 1 FROM names WHERE scope = ? AND name = ? AND owner = ? AND state = ?",
                           (scope, name, file_id, NameState.REMOVING.value))
        return bool(rows)

    def finish_removal(self, scope: str, name: str, file_id: int) -> None:
        """The copies under scope:name are removed: the name is free again."""
        with self._tx() as db:
            db.execute(f"DELETE FROM names WHERE scope = ? AND name = ? AND owner = ? AND state = '{NameState.REMOVING.value}'",
                       (scope, name, file_id))

    def ended_holders(self) -> list[int]:
        """Ended versions that still hold something to clean up after a crash: a name being removed
        or reserved for a first copy never bound, or a first copy never registered ('sent')."""
        # both halves through partial indexes: the start of an agent with a million names reads only
        # the few rows mid-way
        return [r[0] for r in self._query(
            f"SELECT n.owner FROM names n {self._dialect.hint('names_pending')} JOIN files f ON f.id = n.owner "
            "WHERE n.state != 'bound' AND f.state = 'superseded' "
            f"UNION SELECT r.file_id FROM replicas r {self._dialect.hint('replicas_sent')} JOIN files f ON f.id = r.file_id "
            "WHERE r.state = 'sent' AND f.state = 'superseded' AND EXISTS (SELECT 1 FROM names n "
            "WHERE n.owner = r.file_id) ORDER BY 1")]

    def replicas(self, file_id: int) -> list[dict[str, Any]]:
        """The copies recorded for `file_id`, by location."""
        return [dict(r) for r in self._query("SELECT * FROM replicas WHERE file_id = ? ORDER BY location",
                                             (file_id,))]

    def notices(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest notices for operators (paths that are not taken), newest first."""
        rows = self._query("SELECT * FROM notices ORDER BY last_seen DESC LIMIT ?", (limit,))
        return [{**{k: r[k] for k in r.keys() if k != "path"}} for r in rows]

    def recent_errors(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest problem events (lifecycle.PROBLEMS: failures, stuck or lost copies, versions
        superseded), newest first."""
        rows = self._query(
            "SELECT e.at, e.event, e.to_state, e.detail, f.id, f.rule, f.relpath FROM events e "
            f"JOIN files f ON f.id = e.file_id WHERE e.event IN {_PROBLEM_EVENTS} ORDER BY e.id DESC LIMIT ?",
            (limit,))
        out = []
        for r in rows:
            d = json.loads(r["detail"]) if r["detail"] else {}
            out.append({"at": r["at"], "file_id": r["id"], "rule": r["rule"], "path": r["relpath"],
                        "event": r["event"], "state": r["to_state"], "reason": d.get("reason")})
        return out

    def deleted_bytes_since(self, since: float) -> list[tuple[float, int]]:
        """(deleted_at, size) of every file deleted from the buffer since `since`."""
        rows = self._query("SELECT deleted_at, size FROM files WHERE state = 'deleted' AND deleted_at >= ?",
                           (since,))
        return [(r[0], r[1]) for r in rows]

    # ------------------------------------------------------------ writing
    def discover(self, rule: str, path: bytes, relpath: str, dev: int, inode: int, size: int,
                 mtime_ns: int, priority: int) -> FileRecord:
        """A new version of the file at `path`, or the live one it has by now: the caller saw none,
        but another agent sharing the ledger (or the caller's own previous look) may have added it
        meanwhile. One live row per path, whoever saw the file first (checked under the write lock)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM files WHERE rule = ? AND path = ? AND state NOT IN "
                             "('deleted', 'superseded')", (rule, path)).fetchone()
            fid = row[0] if row else self._insert_version(db, rule, path, relpath, dev, inode, size, mtime_ns,
                                                          priority)
        return self.get(fid)

    def discover_many(self, rule: str, found: Sequence[tuple[bytes, str, int, int, int, int]],
                      priority: int) -> int:
        """New versions of many files, (path, relpath, dev, inode, size, mtime_ns) each, in one commit
        (a rescan of a large tree: one fsync per thousand files, not per file), and their notices
        cleared. A path that has a live row by now is left alone. Returns how many were added."""
        added = 0
        with self._tx() as db:
            for path, relpath, dev, inode, size, mtime_ns in found:
                if db.execute("SELECT 1 FROM files WHERE rule = ? AND path = ? AND state NOT IN "
                              "('deleted', 'superseded')", (rule, path)).fetchone():
                    continue
                self._insert_version(db, rule, path, relpath, dev, inode, size, mtime_ns, priority)
                db.execute("DELETE FROM notices WHERE path = ?", (path,))
                added += 1
        return added

    def _insert_version(self, db: Any, rule: str, path: bytes, relpath: str, dev: int,
                        inode: int, size: int, mtime_ns: int, priority: int) -> int:
        now = self._clock()
        prev = db.execute("SELECT MAX(version) FROM files WHERE rule = ? AND path = ?",
                          (rule, path)).fetchone()[0] or 0
        fid = db.execute(
            "INSERT INTO files (rule, path, relpath, version, dev, inode, size, mtime_ns, state, "
            "priority, first_seen, changed_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (rule, path, relpath, prev + 1, dev, inode, size, mtime_ns, State.DISCOVERED.value,
             priority, now, now, now)).fetchone()[0]
        self._event(db, fid, None, State.DISCOVERED, Event.DISCOVERED,
                    {"size": size, "inode": inode, "mtime_ns": mtime_ns, "version": prev + 1})
        return fid

    def restat(self, file_id: int, dev: int, inode: int, size: int, mtime_ns: int) -> FileRecord:
        """The file is still being written: remember its new stat and when it changed (not an event)."""
        now = self._clock()
        with self._tx() as db:
            db.execute("UPDATE files SET dev=?, inode=?, size=?, mtime_ns=?, changed_at=?, updated_at=? "
                       "WHERE id=?", (dev, inode, size, mtime_ns, now, now, file_id))
        return self.get(file_id)

    def transition(self, file_id: int, expect: State, event: Event, detail: dict[str, Any] | None = None,
                   *, copies: Sequence[WrittenCopy] = (), holder: str | None = None, epoch: str | None = None,
                   night: tuple[str, float] | None = None, **updates: Any) -> FileRecord:
        """Move one file along the lifecycle, atomically, with its event, and with `copies` recorded in
        the same commit (the copy a step wrote and the move it ends with: a crash keeps both or
        neither, as a crash right after the write would). `holder`: the agent whose claim the step
        ran under, which must still hold the row (a fencing check: an agent that stalled past its
        lease commits nothing over the new holder's work). `night` (night, its end): the `dataset` set
        is a night that must still be open (NightClosed), recorded open if new. Raises StaleTransition."""
        with self._tx() as db:
            if holder is not None:
                self._fence(db, file_id, holder, epoch)
            if night is not None and updates.get("dataset"):
                self._enter_night(db, file_id, updates["dataset"], night, self._clock())
            for copy in copies:
                self._record_copy(db, file_id, copy)
            self._transition(db, file_id, expect, event, detail, updates)
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _row(row)

    def transition_many(self, file_ids: Sequence[int], expect: State, event: Event,
                        detail: dict[str, Any] | None = None, **updates: Any) -> list[int]:
        """The same transition for many files in one commit (e.g. a thousand files found complete
        in one tick); files no longer in `expect` are skipped. Returns the ids moved."""
        moved: list[int] = []
        with self._tx() as db:
            for fid in file_ids:
                try:
                    self._transition(db, fid, expect, event, detail, dict(updates))
                except StaleTransition:
                    continue
                moved.append(fid)
        return moved

    def transition_group(self, moves: Sequence[Move], holder: str | None = None,
                         epoch: str | None = None) -> list[FileRecord]:
        """Many files' moves (each its own event, detail and columns) in one commit: a batch step's
        outcome, acknowledged together. A file no longer where its move expects it (or, with
        `holder`, no longer held by it) is skipped. Returns the records moved, as they are now, in
        the order given."""
        moved: list[int] = []
        with self._tx() as db:
            for m in moves:
                try:
                    if holder is not None:
                        self._fence(db, m.file_id, holder, epoch)
                    self._transition(db, m.file_id, m.expect, m.event, m.detail, dict(m.updates))
                except StaleTransition:
                    continue
                moved.append(m.file_id)
        return self.get_many(moved)

    def get_many(self, file_ids: Sequence[int]) -> list[FileRecord]:
        """The records of `file_ids`, in that order (ids unknown to the ledger left out)."""
        rows: dict[int, FileRecord] = {}
        ids = list(file_ids)
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            for r in self._query(f"SELECT * FROM files WHERE id IN ({','.join('?' * len(part))})", part):
                rows[r["id"]] = _row(r)
        return [rows[i] for i in ids if i in rows]

    def _fence(self, db: Any, file_id: int, holder: str, epoch: str | None = None) -> None:
        """StaleTransition if another agent holds `file_id` (in the committing transaction, under the
        ledger's write lock: no claim slips in between). A row nobody holds may be moved by any
        agent, as without claims (an ended version's clean-up, a step of an agent whose claim was
        released); a row held by another agent is that agent's, even past its lease, until it is
        claimed anew: an agent that stalled past its lease commits nothing over the new holder's work."""
        row = db.execute("SELECT claim_owner, claim_epoch FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is not None and row[0] is not None and row[0] != holder:
            raise StaleTransition(f"file {file_id}: held by {row[0]}, not {holder}")
        if row is not None and epoch is not None and row[1] is not None and row[1] != epoch:
            raise StaleTransition(f"file {file_id}: held by another run of {holder}")

    def _transition(self, db: Any, file_id: int, expect: State, event: Event,
                    detail: dict[str, Any] | None, updates: dict[str, Any]) -> None:
        """Store the move lifecycle.apply() computes (what the caller passes overrides its columns)."""
        row = db.execute("SELECT state, resume_state FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None or row["state"] != expect.value:
            raise StaleTransition(f"file {file_id}: expected {expect}, found {row and row['state']}")
        here = _Here(State(row["state"]), State(row["resume_state"]) if row["resume_state"] else None)
        new, changes = apply(here, event, self._clock())
        changes.update(updates)
        changes["state"] = new
        for k, v in changes.items():
            if k not in _COLS:
                raise KeyError(k)
            if isinstance(v, enum.Enum):
                changes[k] = v.value
        if new is BINDS_NAME:
            # the name is bound to this content in the transition's own transaction
            got = {**dict(db.execute("SELECT scope, name, blake3 FROM files WHERE id = ?", (file_id,)).fetchone()),
                   **{k: v for k, v in changes.items() if k in ("scope", "name", "blake3")}}
            if got["scope"] and got["name"] and got["blake3"]:
                self._bind_name(db, file_id, got["scope"], got["name"], got["blake3"])
                # a name an earlier attempt reserved and this version did not take: free for others
                # (anything written there stays, and is decided by content by whoever wants it)
                db.execute("DELETE FROM names WHERE owner = ? AND state = ? AND NOT (scope = ? AND name = ?)",
                           (file_id, NameState.WRITING.value, got["scope"], got["name"]))
        sets = ", ".join(f"{k} = ?" for k in changes)
        db.execute(f"UPDATE files SET {sets} WHERE id = ?", [*changes.values(), file_id])
        self._event(db, file_id, expect, new, event, detail)

    def set_next_at(self, file_id: int, next_at: float) -> None:
        """Reschedule a step that is waiting on the lake (not a failure: no event)."""
        with self._tx() as db:
            db.execute("UPDATE files SET next_at = ? WHERE id = ?", (next_at, file_id))

    def wake(self, states: Iterable[State], beyond: float | None = None) -> int:
        """Make every file in `states` due now (at start: settings such as the deletion policy
        may have changed while the agent was down), or only those due later than `beyond`."""
        st: list[Any] = [s.value for s in states]
        sql = f"UPDATE files SET next_at = 0 WHERE state IN ({','.join('?' * len(st))})"
        if beyond is not None:
            sql += " AND next_at > ?"
            st.append(beyond)
        with self._tx() as db:
            cur = db.execute(sql, st)
            return cur.rowcount

    def set_lake_ref(self, file_id: int, ref: str | None) -> None:
        """After this, `file_id`'s lake reference (the replication rule's id) is `ref`."""
        with self._tx() as db:
            db.execute("UPDATE files SET lake_ref = ? WHERE id = ?", (ref, file_id))

    def set_lake_refs(self, refs: Sequence[tuple[int, str | None]]) -> None:
        """set_lake_ref for many files, in one transaction."""
        if not refs:
            return
        with self._tx() as db:
            db.executemany("UPDATE files SET lake_ref = ? WHERE id = ?", [(ref, fid) for fid, ref in refs])

    def flag(self, file_id: int, reason: str | None) -> None:
        """Set or clear a warning on a file without moving it (e.g. its rule is stuck)."""
        with self._tx() as db:
            db.execute("UPDATE files SET reason = ? WHERE id = ?", (reason, file_id))

    def note(self, file_id: int, state: State, what: Event, detail: dict[str, Any] | None = None) -> None:
        """An event in a file's history that does not change its state (e.g. 'copy written')."""
        with self._tx() as db:
            self._event(db, file_id, state, state, what, detail)

    def record_replica(self, file_id: int, location: str, url: str, size: int | None,
                       adler32: str | None, state: CopyState, note: tuple[State, Event, dict[str, Any]] | None = None
                       ) -> None:
        """Remember a copy the agent wrote (or found bad); `note` adds its history event in the same commit."""
        with self._tx() as db:
            self._record_copy(db, file_id, WrittenCopy(location, url, size, adler32, state, note))

    def _record_copy(self, db: Any, file_id: int, copy: WrittenCopy) -> None:
        if copy.note is not None:
            self._event(db, file_id, copy.note[0], copy.note[0], copy.note[1], copy.note[2])
        db.execute("INSERT INTO replicas VALUES (?,?,?,?,?,?,?) ON CONFLICT (file_id, location) DO UPDATE "
                   "SET url=excluded.url, size=excluded.size, adler32=excluded.adler32, "
                   "state=excluded.state, at=excluded.at",
                   (file_id, copy.location, copy.url, copy.size, copy.adler32, CopyState(copy.state).value,
                    self._clock()))

    def record_replicas(self, file_id: int, places: Sequence[tuple[str, str]], state: CopyState) -> None:
        """Several copies' state in one commit, (location, url) each: e.g. 'writing', recorded before
        the bytes go to URLs found empty, so a crash mid-write leaves a URL known to be this version's."""
        now = self._clock()
        with self._tx() as db:
            for location, url in places:
                db.execute("INSERT INTO replicas VALUES (?,?,?,NULL,NULL,?,?) ON CONFLICT (file_id, location) "
                           "DO UPDATE SET url=excluded.url, state=excluded.state, at=excluded.at",
                           (file_id, location, url, CopyState(state).value, now))

    def mark_copies(self, copies: Sequence[tuple[int, str]], state: CopyState) -> None:
        """The state of many recorded copies, (file id, location) each, in one commit (a batch's
        copies recorded in the catalogue); size, adler32 and URL are kept."""
        if not copies:
            return
        now = self._clock()
        with self._tx() as db:
            db.executemany("UPDATE replicas SET state = ?, at = ? WHERE file_id = ? AND location = ?",
                           [(CopyState(state).value, now, fid, loc) for fid, loc in copies])

    def copy_written(self, scope: str, name: str, location: str, url: str) -> bool:
        """Has a version given scope:name (so: these very bytes) written a copy at `url`, or begun to
        (found it empty and claimed it: a crash between its last upload and the commit that records
        it leaves the copy whole and the row 'writing')? What is there is then theirs, whole or not."""
        return bool(self._query(
            "SELECT 1 FROM replicas r JOIN files f ON f.id = r.file_id WHERE f.scope = ? AND f.name = ? "
            f"AND r.location = ? AND r.url = ? AND r.state IN {_sql_list((*COPIES_WRITTEN, CopyState.WRITING))} "
            "LIMIT 1", (scope, name, location, url)))

    def names_owned(self, file_id: int) -> list[tuple[str, str, NameState, str | None]]:
        """(scope, name, state, first_url) of the names this version holds."""
        return [(r[0], r[1], NameState(r[2]), r[3]) for r in self._query(
            "SELECT scope, name, state, first_url FROM names WHERE owner = ?", (file_id,))]

    def notice(self, rule: str, path: bytes, kind: str, detail: str) -> bool:
        """Report something in a watched tree that will not be handled. True if it is new."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT kind, detail FROM notices WHERE path = ?", (path,)).fetchone()
            db.execute("INSERT INTO notices VALUES (?,?,?,?,?,?,?,1) ON CONFLICT (path) DO UPDATE SET "
                       "kind=excluded.kind, detail=excluded.detail, last_seen=excluded.last_seen, "
                       "count=notices.count+1", (path, rule, display_path(path), kind, detail, now, now))
        return row is None or (row["kind"], row["detail"]) != (kind, detail)

    def clear_notice(self, path: bytes) -> None:
        """After this, no notice is held for `path`."""
        with self._tx() as db:
            db.execute("DELETE FROM notices WHERE path = ?", (path,))

    def _event(self, db: Any, file_id: int, frm: State | None, to: State, event: Event,
               detail: dict[str, Any] | None) -> None:
        db.execute("INSERT INTO events (file_id, at, from_state, to_state, event, detail) VALUES (?,?,?,?,?,?)",
                   (file_id, self._clock(), frm.value if frm else None, to.value, Event(event).value,
                    json.dumps(detail, default=str) if detail else None))

    def iter_all(self) -> Iterator[FileRecord]:
        """Every row, in id order."""
        for r in self._query("SELECT * FROM files ORDER BY id"):
            yield _row(r)

    # ------------------------------------------------------------ one uplink for the fleet (core/uplink.py)
    def share_uplink(self, agent: str, decide: Callable[[list[Post]], Post]) -> Post:
        """One round of the fleet's uplink budget, in one transaction under the ledger's write lock:
        the other agents' posts read (their age on the database's clock, the same for every host),
        `decide` given them, and the post it answers stored as `agent`'s. Two agents never decide
        from the same view, so the shares they post never add up to more than the cap."""
        now = self._dialect.now
        with self._tx() as db:
            rows = db.execute(f"SELECT agent_id, wants, held, rate, share, {now} - at FROM uplink "
                              "WHERE agent_id != ?", (agent,)).fetchall()
            post = decide([Post(r[0], bool(r[1]), bool(r[2]), r[3], r[4], r[5]) for r in rows])
            db.execute(f"INSERT INTO uplink VALUES (?,?,?,?,?,{now}) ON CONFLICT (agent_id) DO UPDATE SET "
                       "wants = excluded.wants, held = excluded.held, rate = excluded.rate, "
                       "share = excluded.share, at = excluded.at",
                       (agent, int(post.wants), int(post.held), post.rate, post.share))
        return post

    def uplink_posts(self) -> list[Post]:
        """Every agent's last post of its use of the uplink, with its age (the fleet's view)."""
        rows = self._query(f"SELECT agent_id, wants, held, rate, share, {self._dialect.now} - at FROM uplink "
                           "ORDER BY agent_id")
        return [Post(r[0], bool(r[1]), bool(r[2]), r[3], r[4], r[5]) for r in rows]
