"""The invariant checker itself: each broken invariant is reported (a checker that cannot fail proves nothing)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from tests.faults.local_invariants import Manifest, adler32_of, check


class World:
    """A buffer, a ledger, a catalogue and two lake directories, written by hand."""

    def __init__(self, tmp: Path) -> None:
        self.buffer, self.ledger, self.catalogue = tmp / "buffer", tmp / "ledger.sqlite", tmp / "catalog.sqlite"
        self.lakes = {"l1": tmp / "l1", "l2": tmp / "l2"}
        for p in (self.buffer, *self.lakes.values()):
            p.mkdir()
        self.m = Manifest(self.buffer)
        db = sqlite3.connect(self.ledger)
        db.executescript("CREATE TABLE files (id INTEGER PRIMARY KEY, path BLOB, state TEXT, reason TEXT, "
                         "scope TEXT, name TEXT); CREATE TABLE notices (path BLOB, detail TEXT);")
        db.close()
        db = sqlite3.connect(self.catalogue)
        db.executescript("CREATE TABLE dids (scope, name, type, bytes, adler32); "
                         "CREATE TABLE replicas (scope, name, location);")
        db.close()

    def row(self, rel: str, state: str, reason: str | None = None, name: str | None = None) -> None:
        with sqlite3.connect(self.ledger) as db:
            db.execute("INSERT INTO files (path, state, reason, scope, name) VALUES (?,?,?,?,?)",
                       (os.fsencode(self.buffer / rel), state, reason, "s", name))

    def delivered(self, rel: str, data: bytes, copies: tuple[str, ...] = ("l1", "l2")) -> None:
        self.row(rel, "deleted", name=rel)
        with sqlite3.connect(self.catalogue) as db:
            db.execute("INSERT INTO dids VALUES ('s', ?, 'FILE', ?, ?)", (rel, len(data), adler32_of(data)))
            for lk in copies:
                (self.lakes[lk] / "s").mkdir(exist_ok=True)
                (self.lakes[lk] / "s" / rel).write_bytes(data)
                db.execute("INSERT INTO replicas VALUES ('s', ?, ?)", (rel, lk))

    def check(self, settled: bool = True) -> list[str]:
        return check(self.m, self.ledger, self.lakes, self.catalogue, copies=2, settled=settled)


def test_a_consistent_world_passes(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.m.record("gone.fits", b"data")
    w.delivered("gone.fits", b"data")
    w.m.write("held.fits", b"h")
    w.row("held.fits", "quarantined", reason="name pattern")
    assert w.check() == []


def test_each_broken_invariant_is_reported(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.m.record("one-copy.fits", b"1")
    w.delivered("one-copy.fits", b"1", copies=("l1",))
    w.m.record("vanished.fits", b"2")                       # gone with no deletion recorded
    w.m.write("changed.fits", b"3")
    (w.buffer / "changed.fits").write_bytes(b"33")
    w.row("changed.fits", "discovered")
    w.m.write("unexplained.fits", b"4")
    w.m.write("half.fits", b"5")
    w.row("half.fits", "registered", name="half.fits")
    w.m.write("mute.fits", b"6")
    w.row("mute.fits", "quarantined")
    with sqlite3.connect(w.catalogue) as db:
        db.execute("INSERT INTO dids VALUES ('s', 'orphan', 'FILE', 1, 'x')")
    (w.lakes["l2"] / ".x.edge-agent-part").write_bytes(b"partial")
    problems = "\n".join(w.check())
    for expected in ("one-copy.fits: deleted locally with 1 good copies of 2",
                     "vanished.fits: left the buffer but no ledger row says it was deleted",
                     "changed.fits: the buffer copy changed",
                     "unexplained.fits: still in the buffer, but the ledger has no live row and no notice",
                     "half.fits: still registered after the scenario settled",
                     "mute.fits: quarantined without a reason",
                     "catalogue has s:orphan, which no ledger row knows",
                     "l2: partial copy left behind"):
        assert expected in problems, expected
    assert "half.fits" not in "\n".join(w.check(settled=False))
