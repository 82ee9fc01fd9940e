"""The ledger's book of nights (the `nights` table, made with the ledger's schema): which nights of
which rules are open, being closed or closed, with their verdicts, and the reads a close-out needs.
A part of edge_agent.ledger.Ledger (it inherits this), kept apart because it is one concern."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .core.lifecycle import State
from .core.nights import late_of

if TYPE_CHECKING:
    from .ledger import FileRecord

OPEN, CLOSING, CLOSED = "open", "closing", "closed"


class NightClosed(Exception):
    """The dataset a version was to be hashed into is a night being closed or closed: it is late."""


class NightBook:
    """Methods of Ledger over the `nights` table (they use its transactions and readers)."""

    # provided by Ledger
    _tx: Any
    _query: Any
    _clock: Any

    def _enter_night(self, db: Any, file_id: int, dataset: str, night: tuple[str, float], now: float) -> None:
        """In a hashing move's transaction: `dataset` must be an open night (else NightClosed), and
        is recorded open if it is new. Under the ledger's write lock: a night being closed takes no
        file after its close-out has read its files."""
        rule = db.execute("SELECT rule FROM files WHERE id = ?", (file_id,)).fetchone()[0]
        row = db.execute("SELECT state FROM nights WHERE rule = ? AND dataset = ?", (rule, dataset)).fetchone()
        if row is not None and row[0] != OPEN:
            raise NightClosed(f"{rule}: night {dataset} is {row[0]}")
        if row is None:
            db.execute("INSERT INTO nights (rule, dataset, night, ends_at, state, late_of, opened_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rule, dataset) DO NOTHING",
                       (rule, dataset, night[0], night[1], OPEN, late_of(dataset), now))

    def refile_late(self, file_id: int, dataset: str, late: str, night: tuple[str, float]) -> bool:
        """A hashed version whose night `dataset` was closed before it was registered (an operator's
        retry, say) goes to the late dataset `late` (recorded open), in one transaction; False when
        the row is no longer in `dataset` or `late` is not open."""
        with self._tx() as db:
            try:
                self._enter_night(db, file_id, late, night, self._clock())
            except NightClosed:
                return False
            cur = db.execute("UPDATE files SET dataset = ? WHERE id = ? AND dataset = ?", (late, file_id, dataset))
            return bool(cur.rowcount)

    def add_night(self, rule: str, dataset: str, night: str, ends_at: float) -> None:
        """After this, night `dataset` of `rule` is recorded (open, unless it was recorded before)."""
        with self._tx() as db:
            db.execute("INSERT INTO nights (rule, dataset, night, ends_at, state, late_of, opened_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rule, dataset) DO NOTHING",
                       (rule, dataset, night, ends_at, OPEN, late_of(dataset), self._clock()))

    def set_night(self, rule: str, dataset: str, expect: str, state: str, **cols: Any) -> bool:
        """Move night `dataset` of `rule` from `expect` to `state` with `cols` (verdict, reasons,
        files, bytes, manifest, closed_at); False (nothing written) when it is not in `expect`."""
        if "reasons" in cols and not isinstance(cols["reasons"], str | None):
            cols["reasons"] = json.dumps(list(cols["reasons"]))
        allowed = {"verdict", "reasons", "files", "bytes", "manifest", "closed_at"}
        if not set(cols) <= allowed:
            raise KeyError(sorted(set(cols) - allowed))
        sets = "".join(f", {k} = ?" for k in cols)
        with self._tx() as db:
            cur = db.execute(f"UPDATE nights SET state = ?{sets} WHERE rule = ? AND dataset = ? AND state = ?",
                             [state, *cols.values(), rule, dataset, expect])
            return bool(cur.rowcount)

    def night_states(self, rule: str, datasets: Sequence[str]) -> dict[str, str]:
        """The state of each of `datasets` the book records for `rule`."""
        out: dict[str, str] = {}
        names = list(datasets)
        for i in range(0, len(names), 500):
            part = names[i:i + 500]
            rows = self._query(f"SELECT dataset, state FROM nights WHERE rule = ? AND dataset IN "
                               f"({','.join('?' * len(part))})", [rule, *part])
            out.update({r[0]: r[1] for r in rows})
        return out

    def night_closed_at(self, rule: str, dataset: str) -> float | None:
        """When night `dataset` of `rule` was closed (None: it is not closed)."""
        rows = self._query("SELECT closed_at FROM nights WHERE rule = ? AND dataset = ? AND state = ?",
                           (rule, dataset, CLOSED))
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def unclosed_nights(self, rule: str) -> list[dict[str, Any]]:
        """The nights of `rule` not closed yet (open, or a close-out under way), oldest first."""
        return [_night(r) for r in self._query(
            "SELECT * FROM nights WHERE rule = ? AND state != ? ORDER BY ends_at, dataset", (rule, CLOSED))]

    def nights(self, limit: int = 100, rule: str | None = None) -> list[dict[str, Any]]:
        """The latest `limit` nights (of `rule`), newest first."""
        where, args = ("WHERE rule = ?", [rule]) if rule else ("", [])
        return [_night(r) for r in self._query(
            f"SELECT * FROM nights {where} ORDER BY ends_at DESC, dataset DESC LIMIT ?", [*args, limit])]

    def night_summary(self) -> list[dict[str, Any]]:
        """Per rule: nights by state and verdict, late files, the last closing (one row per rule,
        state and verdict; the table holds one row per night: a few hundred a year per rule)."""
        return [dict(r) for r in self._query(
            "SELECT rule, state, verdict, COUNT(*) AS nights, MAX(closed_at) AS last_closed, "
            "SUM(CASE WHEN late_of IS NULL THEN 0 ELSE files END) AS late_files, MIN(ends_at) AS oldest_end "
            "FROM nights GROUP BY rule, state, verdict")]

    def night_files(self, rule: str, dataset: str | None) -> list[tuple[FileRecord, State | None]]:
        """The versions hashed into `dataset` of `rule` (None: those not hashed yet that may still
        be delivered: not ended), each with the state of the newest later version of its path (None:
        there is none)."""
        from .ledger import _row  # the ledger's own row type (it imports this module)
        succ = ("(SELECT f2.state FROM files f2 WHERE f2.rule = f.rule AND f2.path = f.path "
                "AND f2.version > f.version ORDER BY f2.version DESC LIMIT 1)")
        if dataset is None:
            rows = self._query(f"SELECT f.*, {succ} AS successor FROM files f WHERE f.rule = ? AND "
                               "f.dataset IS NULL AND f.state NOT IN (?, ?) ORDER BY f.id",
                               (rule, State.DELETED.value, State.SUPERSEDED.value))
        else:
            rows = self._query(f"SELECT f.*, {succ} AS successor FROM files f WHERE f.rule = ? AND "
                               "f.dataset = ? ORDER BY f.id", (rule, dataset))
        return [(_row(r), State(r["successor"]) if r["successor"] else None) for r in rows]


def _night(r: Any) -> dict[str, Any]:
    d = dict(r)
    d["reasons"] = json.loads(d["reasons"]) if d.get("reasons") else []
    return d
