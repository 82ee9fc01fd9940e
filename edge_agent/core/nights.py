"""Night close-out as plain functions: when a night's files are all accounted for, what the verdict
is, when a night is overdue, where a late file goes and what the manifest says.

A night is one rule's dataset (its `dataset_template` holds `{night}`): identified by (rule, dataset).
Nothing here reads a clock or the ledger: the shell (edge_agent/nights.py) passes `now` and the rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .lifecycle import State

# a file in one of these has ended its life at the edge: its night may close
_DELIVERED = frozenset({State.DELETED})
_ENDED = frozenset({State.DELETED, State.QUARANTINED, State.SUPERSEDED})
# the suffix of the dataset a night's late files go to (".late", then ".late2", ...)
LATE = ".late"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = 1


class Verdict:
    """The words a closed night's verdict is stored and exported under."""
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class NightFile:
    """One version of one file of a night, as the ledger holds it."""
    id: int
    relpath: str
    version: int
    state: State
    size: int | None
    did: str | None = None
    adler32: str | None = None
    blake3: str | None = None
    confirmed_at: float | None = None
    reason: str | None = None
    replicas: tuple[tuple[str, str], ...] = ()   # (location, url) the ledger recorded
    mtime: float | None = None
    # superseded: the state of the newest version of the same path (None: there is none)
    successor: State | None = None


@dataclass(frozen=True)
class Decision:
    """What to do with an open night now."""
    close: bool                     # every file is accounted for and the grace period is over
    verdict: str | None             # with close: Verdict.COMPLETE or INCOMPLETE
    reasons: tuple[str, ...]        # with INCOMPLETE: why, one line per file at fault
    waiting: str                    # without close: what the night waits for
    overdue: bool                   # not closed and its deadline passed
    files: int
    bytes: int


def night_end(night: str, rollover_hour: int, tz: dt.tzinfo) -> float:
    """When night YYYYMMDD ends (policy.night_of): the next day's rollover hour, local time."""
    day = dt.datetime.strptime(night, "%Y%m%d").date() + dt.timedelta(days=1)
    return dt.datetime.combine(day, dt.time(rollover_hour), tzinfo=tz).timestamp()


def is_overdue(ends_at: float, deadline_s: float, now: float) -> bool:
    """Has an unclosed night ending at `ends_at` passed its deadline?"""
    return now >= ends_at + deadline_s


def accounted(f: NightFile, confirmed_is_final: bool) -> bool:
    """Has this version ended its life at the edge (its night need wait no longer for it)?
    `confirmed_is_final`: the rule keeps confirmed files (delete = keep/never, dry-run)."""
    if f.state is State.SUPERSEDED:
        # a rewrite's newer version is what is delivered: the night waits for it
        return f.successor is None or f.successor in _ENDED or (confirmed_is_final and f.successor is State.CONFIRMED)
    return f.state in _ENDED or (confirmed_is_final and f.state is State.CONFIRMED)


def problem(f: NightFile) -> str | None:
    """Why this version makes its night incomplete, or None (delivered, or replaced by a delivered version)."""
    if f.state is State.QUARANTINED:
        return f"{f.relpath}: quarantined: {f.reason or 'no reason recorded'}"
    if f.state is State.SUPERSEDED:
        if f.successor is None:
            return f"{f.relpath}: superseded and no later version delivered: {f.reason or 'no reason recorded'}"
        if f.successor is State.QUARANTINED:
            return f"{f.relpath}: superseded by a version that is quarantined"
    return None


def decide(files: Sequence[NightFile], ends_at: float, now: float, grace_s: float, deadline_s: float,
           confirmed_is_final: bool) -> Decision:
    """The decision for an open night ending at `ends_at` whose versions are `files` (hashed into it,
    or not hashed yet with an mtime in it)."""
    size = sum(f.size or 0 for f in files if f.state is not State.SUPERSEDED)
    n = sum(1 for f in files if f.state is not State.SUPERSEDED)
    overdue = is_overdue(ends_at, deadline_s, now)
    if now < ends_at + grace_s:
        return Decision(False, None, (), "the night and its grace period are not over", overdue, n, size)
    busy = [f for f in files if not accounted(f, confirmed_is_final)]
    if busy:
        states = sorted({str(f.state) for f in busy})
        return Decision(False, None, (), f"{len(busy)} file(s) still in {', '.join(states)}", overdue, n, size)
    reasons = tuple(p for f in sorted(files, key=lambda f: (f.relpath, f.version)) if (p := problem(f)))
    return Decision(True, Verdict.INCOMPLETE if reasons else Verdict.COMPLETE, reasons, "", False, n, size)


def late_dataset(dataset: str, closed: Collection[str]) -> str:
    """The dataset a late file of `dataset` goes to: `<dataset>.late`, or the first of `.late2`,
    `.late3`... not closed yet (a late dataset is itself closed by the same rules)."""
    base = dataset
    for n in range(1, 10_000):
        name = f"{base}{LATE}" if n == 1 else f"{base}{LATE}{n}"
        if name not in closed:
            return name
    raise ValueError(f"too many late datasets of {dataset}")


def late_of(dataset: str) -> str | None:
    """The night a late dataset belongs to (None: `dataset` is not a late one)."""
    head, sep, tail = dataset.rpartition(LATE)
    if sep and head and (tail == "" or tail.isdigit()):
        return head
    return None


def manifest(rule: str, scope: str, dataset: str, night: str | None, files: Iterable[NightFile],
             decision: Decision, written_at: float) -> dict[str, Any]:
    """The night's manifest, as JSON-able data: every version (delivered, quarantined, superseded
    with its reason), the verdict and its reasons."""
    entries = []
    for f in sorted(files, key=lambda f: (f.relpath, f.version)):
        entries.append({
            "did": f.did, "path": f.relpath, "version": f.version, "state": str(f.state), "size": f.size,
            "adler32": f.adler32, "blake3": f.blake3, "confirmed_at": f.confirmed_at,
            "replicas": [{"location": loc, "url": url} for loc, url in f.replicas],
            **({"reason": f.reason} if f.state in (State.QUARANTINED, State.SUPERSEDED) else {}),
        })
    return {"format": MANIFEST_FORMAT, "rule": rule, "scope": scope, "dataset": dataset, "night": night,
            "late_of": late_of(dataset), "verdict": decision.verdict, "reasons": list(decision.reasons),
            "files": decision.files, "bytes": decision.bytes, "written_at": written_at, "entries": entries}
