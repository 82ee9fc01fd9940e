"""The embedded default lake: destinations are directories, the catalogue a small SQLite file.

The catalogue records DIDs, dataset membership and replicas the way Rucio would, so a
data manager can audit a night with one query. It is never trusted for confirmation:
each copy is read back (or its recorded checksum checked) when the file is confirmed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from .. import places
from ..errors import PermanentError, RetryableError
from ..settings import DestinationSettings
from ..urls import scheme_of
from .base import Catalogue, LakeFile, ListedFile, ListedReplica, NoCatalogue, RecordedReplica, Records, Target

log = structlog.get_logger("edge_agent.lake.local")

# the kinds of RecordedReplica.places the local lake names: two copies sharing one count once
PLACE_TOKEN = "place token"       # one filesystem (places.token), whatever device it shows
PHYSICAL_FILE = "file"            # one file (device, inode), whatever path reaches it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dids (
    scope TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
    bytes INTEGER, adler32 TEXT, md5 TEXT, meta TEXT, created_at REAL NOT NULL,
    PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS contents (
    scope TEXT NOT NULL, name TEXT NOT NULL, child_scope TEXT NOT NULL, child_name TEXT NOT NULL,
    PRIMARY KEY (scope, name, child_scope, child_name));
CREATE TABLE IF NOT EXISTS replicas (
    scope TEXT NOT NULL, name TEXT NOT NULL, location TEXT NOT NULL, url TEXT NOT NULL,
    bytes INTEGER, adler32 TEXT, created_at REAL NOT NULL,
    PRIMARY KEY (scope, name, location));
CREATE TABLE IF NOT EXISTS closed (
    scope TEXT NOT NULL, name TEXT NOT NULL, closed_at REAL NOT NULL,
    PRIMARY KEY (scope, name));
"""


@contextlib.contextmanager
def _catalogue_errors() -> Iterator[None]:
    """The catalogue's disk full or failing: the lake is unavailable for now, as a server would be."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise RetryableError(f"local lake catalogue: {exc}") from None


class LocalCatalogue(Catalogue, Records):
    """The embedded lake's catalogue: copies go to `destinations` (directories), below each at
    scope/name; the catalogue records them in a SQLite file at `catalog_path`.

    The only place that knows the catalogue's schema: `audit` and the access API read it through
    `read_only` (Records), never with SQL of their own."""

    def __init__(self, catalog_path: Path, destinations: dict[str, DestinationSettings],
                 name_pattern: str, *, read_only: bool = False) -> None:
        self.name_pattern = name_pattern
        self.destinations = destinations
        self._lock = threading.Lock()
        if read_only:
            if not catalog_path.exists():
                raise NoCatalogue(f"no local lake catalogue at {catalog_path}: the agent has not registered "
                                  "anything yet")
            self._db = sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True, check_same_thread=False)
            return
        catalog_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(catalog_path), check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # a record for auditing, never the evidence for deletion (copies are read back): NORMAL is enough
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def read_only(cls, catalog_path: Path, destinations: dict[str, DestinationSettings] | None = None,
                  name_pattern: str = ".+") -> LocalCatalogue:
        """The catalogue at `catalog_path` opened for reading only (`audit`, the access API, even
        while the agent runs): nothing is created, the file is never written. Raises NoCatalogue
        (a ConfigError) when there is no catalogue there yet."""
        return cls(catalog_path, dict(destinations or {}), name_pattern, read_only=True)

    # ------------------------------------------------------------ Records
    def dataset_files(self, scope: str, name: str) -> list[ListedFile]:
        with self._lock, _catalogue_errors():
            rows = self._db.execute(
                "SELECT d.scope, d.name, d.bytes, d.adler32, d.md5 FROM contents c JOIN dids d "
                "ON d.scope = c.child_scope AND d.name = c.child_name WHERE c.scope = ? AND c.name = ? "
                "ORDER BY d.scope, d.name", (scope, name)).fetchall()
        return [ListedFile(*row) for row in rows]

    def lookup(self, dids: Sequence[tuple[str, str]],
               schemes: Sequence[str] | None = None) -> dict[tuple[str, str], ListedFile]:
        out = {}
        with self._lock, _catalogue_errors():
            for scope, name in dids:
                row = self._db.execute("SELECT bytes, adler32, md5 FROM dids WHERE scope = ? AND name = ? "
                                       "AND type = 'FILE'", (scope, name)).fetchone()
                if row is None:
                    continue
                reps = self._db.execute("SELECT location, url FROM replicas WHERE scope = ? AND name = ? "
                                        "ORDER BY location", (scope, name)).fetchall()
                # every replica the local lake records is usable: it is written before it is recorded
                listed = tuple(ListedReplica(loc, "AVAILABLE", (url,) if not schemes or scheme_of(url) in schemes
                                             else ()) for loc, url in reps)
                out[(scope, name)] = ListedFile(scope, name, row[0], row[1], row[2], listed)
        return out

    def _root(self, location: str) -> Path:
        path = self.destinations[location].path
        assert path is not None, "settings validation guarantees a path for posix destinations"
        return path

    def url(self, location: str, f: LakeFile) -> str:
        """Where `location`'s copy of `f` lies."""
        return os.path.join(str(self._root(location)), f.scope, f.name)

    def name_free(self, scope: str, name: str) -> bool:
        with self._lock, _catalogue_errors():
            row = self._db.execute("SELECT 1 FROM dids WHERE scope=? AND name=?", (scope, name)).fetchone()
        return row is None

    def register(self, f: LakeFile) -> None:
        with self._lock, _catalogue_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT type, bytes, adler32 FROM dids WHERE scope=? AND name=?",
                                       (f.scope, f.name)).fetchone()
                if row is None:
                    self._db.execute("INSERT INTO dids VALUES (?,?,?,?,?,?,?,?)",
                                     (f.scope, f.name, "FILE", f.size, f.adler32, f.md5,
                                      json.dumps(f.metadata), time.time()))
                elif row != ("FILE", f.size, f.adler32):
                    raise PermanentError(f"DID {f.did} already exists in the lake with other content "
                                         f"({row[0]}, {row[1]} bytes, adler32 {row[2]}); local file has "
                                         f"{f.size} bytes, adler32 {f.adler32}")
                if f.dataset:
                    if self._db.execute("SELECT 1 FROM closed WHERE scope = ? AND name = ?",
                                        (f.scope, f.dataset)).fetchone() is not None \
                            and self._db.execute("SELECT 1 FROM contents WHERE scope = ? AND name = ? AND "
                                                 "child_scope = ? AND child_name = ?",
                                                 (f.scope, f.dataset, f.scope, f.name)).fetchone() is None:
                        # as Rucio: a closed dataset takes nothing more
                        raise PermanentError(f"dataset {f.scope}:{f.dataset} is closed: {f.did} cannot be "
                                             "attached to it")
                    self._db.execute("INSERT OR IGNORE INTO dids VALUES (?,?,?,?,?,?,?,?)",
                                     (f.scope, f.dataset, "DATASET", None, None, None, None, time.time()))
                    self._db.execute("INSERT OR IGNORE INTO contents VALUES (?,?,?,?)",
                                     (f.scope, f.dataset, f.scope, f.name))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:     # SQLite may have rolled back itself (disk full)
                    self._db.execute("ROLLBACK")
                raise

    def close_dataset(self, scope: str, name: str) -> None:
        with self._lock, _catalogue_errors():
            self._db.execute("INSERT OR IGNORE INTO dids VALUES (?,?,?,?,?,?,?,?)",
                             (scope, name, "DATASET", None, None, None, None, time.time()))
            self._db.execute("INSERT OR IGNORE INTO closed VALUES (?,?,?)", (scope, name, time.time()))

    def dataset_closed(self, scope: str, name: str) -> bool:
        """Is dataset scope:name recorded closed (a night closed out)?"""
        with self._lock, _catalogue_errors():
            return self._db.execute("SELECT 1 FROM closed WHERE scope = ? AND name = ?",
                                    (scope, name)).fetchone() is not None

    def targets(self, f: LakeFile) -> list[Target]:
        for loc in f.destinations:
            problem = self._problem(loc)
            if problem:
                raise RetryableError(problem)
        return [Target(loc, self.url(loc, f)) for loc in f.destinations]

    def add_replica(self, f: LakeFile, location: str, url: str) -> None:
        with self._lock, _catalogue_errors():
            self._db.execute("INSERT OR REPLACE INTO replicas VALUES (?,?,?,?,?,?,?)",
                             (f.scope, f.name, location, url, f.size, f.adler32, time.time()))

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        with self._lock, _catalogue_errors():
            rows = self._db.execute("SELECT location FROM replicas WHERE scope=? AND name=?", (scope, name)).fetchall()
        return {r[0] for r in rows}

    def request_copies(self, f: LakeFile) -> str | None:
        """The agent writes every copy itself: nothing to ask."""
        return None

    def recorded(self, f: LakeFile) -> list[RecordedReplica]:
        """Where each destination's copy lies (whatever the catalogue's table says: the copies are
        what counts), with the keys of the place it lies in; nothing there is no replica."""
        out = []
        for loc in f.destinations:
            url = self.url(loc, f)
            # One filesystem seen through mounts with different devices (an overlay and its upper
            # directory, two mounts of one NFS export) shows the same place token in both roots. It
            # is read afresh at each count: a mount made since the last one is seen.
            tok = places.token(self._root(loc))
            if tok is None:
                log.warning("destination without a readable place token: its copy does not count",
                            destination=loc, root=str(self._root(loc)))
                continue
            # Copies are counted per physical file: a destination that became an alias of another
            # after start (a bind mount, a symlink swapped in) must not turn one file into two copies.
            ident = _identity(url)
            keys: tuple[tuple[str, object], ...] = ((PLACE_TOKEN, tok),)
            if ident is not None:
                keys += ((PHYSICAL_FILE, ident),)
            out.append(RecordedReplica(loc, url, f.size, f.adler32, listed=False, places=keys,
                                       verify=self.destinations[loc].verify))
        return out

    def health(self) -> str | None:
        for name in self.destinations:
            problem = self._problem(name)
            if problem:
                return problem
        return None

    def _problem(self, name: str) -> str | None:
        # The destination root is never created by the agent: an unmounted mount point
        # must not quietly fill the DAQ host's own disk.
        d, root = self.destinations[name], self._root(name)
        if not root.is_dir():
            return f"destination {name}: {root} is not a directory (not mounted?)"
        if d.require_file and not (root / d.require_file).exists():
            return f"destination {name}: {root / d.require_file} is missing (not mounted?)"
        if not os.access(root, os.W_OK | os.X_OK):
            return f"destination {name}: {root} is not writable by this user"
        return None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino

