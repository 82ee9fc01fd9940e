"""After a fault scenario on the embedded local lake: was anything lost, half-done or unexplained?

Compares four things without the agent's own code: a manifest the test wrote while it
made each file (size and adler32 at write time), the buffer directory, the ledger (read
only, plain SQLite), and the lake (its destination directories and its catalogue).

  - every file that left the buffer has >= N copies with its size and adler32, and the
    catalogue lists the DID and those replicas;
  - every file still in the buffer is unchanged and the ledger explains why it is still
    there (a live row; a quarantine or retry with its reason; or a notice);
  - nothing is half-done when the scenario has settled: no row stuck between hashing and
    confirmation, no DID in the catalogue that the ledger does not know, no partial copy.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINAL = ("deleted", "superseded")
IN_FLIGHT = ("complete", "hashed", "registered", "copied", "transferred")
TEMP_MARK = ".edge-agent-"     # how the agent names its temporary files (documented in localfs.py)
PLACE_NAME = ".edge-agent-place"   # the place token in each destination's root (places.py): no copy


def adler32_of(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


@dataclass
class Manifest:
    """What the test put in the buffer: relative path (bytes) -> (size, adler32) at write time,
    and its sha256 (lake_invariants compares the storage's copies byte for byte with it)."""
    root: Path
    files: dict[bytes, tuple[int, str]] = field(default_factory=dict)
    digests: dict[bytes, str] = field(default_factory=dict)
    removed: set[bytes] = field(default_factory=set)    # taken away by the test ("someone else")

    def write(self, rel: str | bytes, data: bytes) -> Path:
        path = os.path.join(os.fsencode(self.root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        self.record(rel, data)
        return Path(os.fsdecode(path))

    def record(self, rel: str | bytes, data: bytes) -> None:
        self.files[os.fsencode(rel)] = (len(data), adler32_of(data))
        self.digests[os.fsencode(rel)] = hashlib.sha256(data).hexdigest()

    def remove(self, rel: str | bytes) -> None:
        self.removed.add(os.fsencode(rel))


def _read(ledger: Path | tuple[str, str], sql: str) -> list[Any]:
    """Rows (by column name) of the ledger: a SQLite file, or a PostgreSQL one as (url, password)."""
    if isinstance(ledger, tuple):
        import psycopg
        from psycopg.rows import dict_row
        with psycopg.connect(ledger[0], password=ledger[1], row_factory=dict_row) as pg:
            return pg.execute(sql).fetchall()
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _ledger_rows(ledger: Path | tuple[str, str]) -> list[Any]:
    return _read(ledger, "SELECT * FROM files ORDER BY id")


def _notices(ledger: Path | tuple[str, str]) -> dict[bytes, str]:
    return {bytes(r["path"]): r["detail"] for r in _read(ledger, "SELECT path, detail FROM notices")}


def _catalogue(path: Path) -> tuple[dict[tuple[str, str], tuple[int, str]], set[tuple[str, str, str]]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        dids = {(s, n): (b, a) for s, n, b, a in
                db.execute("SELECT scope, name, bytes, adler32 FROM dids WHERE type = 'FILE'")}
        reps = {(s, n, loc) for s, n, loc in db.execute("SELECT scope, name, location FROM replicas")}
        return dids, reps
    finally:
        db.close()


def _on_disk(path: bytes) -> tuple[int, str] | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    return len(data), adler32_of(data)


def explained(show: str, path: bytes, versions: list[sqlite3.Row], notices: dict[bytes, str] | set[bytes],
              settled: bool) -> list[str]:
    """What is wrong with how the ledger explains a file still in the buffer: a live row (with its
    reason when it waits or needs a person, not in flight once settled), or a notice."""
    live = [r for r in versions if r["state"] not in FINAL]
    if not live:
        # a notice on the file, or on a directory above it (one that cannot be listed)
        if not any(path == n or path.startswith(n + b"/") for n in notices):
            return [f"{show}: still in the buffer, but the ledger has no live row and no notice "
                    f"(rows: {[r['state'] for r in versions]})"]
        return []
    r, problems = live[-1], []
    if r["state"] in ("quarantined", "retry_wait") and not r["reason"]:
        problems.append(f"{show}: {r['state']} without a reason")
    if settled and r["state"] in IN_FLIGHT:
        problems.append(f"{show}: still {r['state']} after the scenario settled (half-done)")
    return problems


def check(manifest: Manifest, ledger: Path, lakes: dict[str, Path], catalogue: Path, copies: int,
          settled: bool = True) -> list[str]:
    """Every broken invariant, as a sentence; [] when all hold. `settled`: nothing may be in flight."""
    problems: list[str] = []
    root = os.fsencode(manifest.root)
    rows = _ledger_rows(ledger)
    notices = _notices(ledger)
    dids, reps = _catalogue(catalogue) if catalogue.exists() else ({}, set())
    by_path: dict[bytes, list[sqlite3.Row]] = {}
    for r in rows:
        by_path.setdefault(bytes(r["path"]), []).append(r)

    for rel, (size, adler) in manifest.files.items():
        path = os.path.join(root, rel)
        show = rel.decode("utf-8", "backslashreplace")
        versions = by_path.get(path, [])
        live = [r for r in versions if r["state"] not in FINAL]
        here = _on_disk(path) if os.path.lexists(path) else None
        if rel in manifest.removed:
            if live and live[-1]["state"] not in ("quarantined",):
                problems.append(f"{show}: removed by someone else, but its row {live[-1]['id']} is still "
                                f"{live[-1]['state']}")
            continue
        if here is None:
            # it left the buffer: only the agent may have taken it, and only with N good copies
            gone = [r for r in versions if r["state"] == "deleted"]
            if not gone:
                problems.append(f"{show}: left the buffer but no ledger row says it was deleted "
                                f"(rows: {[r['state'] for r in versions]})")
                continue
            r = gone[-1]
            good = []
            for lake, lroot in lakes.items():
                got = _on_disk(os.path.join(os.fsencode(lroot), os.fsencode(r["scope"]), os.fsencode(r["name"])))
                if got == (size, adler):
                    good.append(lake)
                if (r["scope"], r["name"], lake) in reps and got != (size, adler):
                    problems.append(f"{show}: catalogue lists a replica at {lake} that does not match ({got})")
            if len(good) < copies:
                problems.append(f"{show}: deleted locally with {len(good)} good copies of {copies} ({good})")
            if dids.get((r["scope"], r["name"])) != (size, adler):
                problems.append(f"{show}: catalogue has {dids.get((r['scope'], r['name']))} for "
                                f"{r['scope']}:{r['name']}, written as {(size, adler)}")
            continue
        if here != (size, adler):
            problems.append(f"{show}: the buffer copy changed ({here}, written as {(size, adler)})")
        problems += explained(show, path, versions, notices, settled)

    known = {(r["scope"], r["name"]) for r in rows if r["name"]}
    for did in dids:
        if did not in known:
            problems.append(f"catalogue has {did[0]}:{did[1]}, which no ledger row knows (orphan registration)")
    for lake, lroot in lakes.items():
        for dirpath, _dirs, names in os.walk(lroot):
            for n in names:
                if TEMP_MARK in n and not (n == PLACE_NAME and dirpath == os.fspath(lroot)):   # the place token
                    problems.append(f"{lake}: partial copy left behind: {os.path.join(dirpath, n)}")
    return problems
