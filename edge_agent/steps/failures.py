"""How a step's failure becomes a move: the error taxonomy decides, never the message text.

    FileChanged       before hashing: back to waiting for completion; after: the version ends
    FileVanished      the version ends (renamed or removed by someone else), said loudly
    ChecksumMismatch  retried a bounded number of times, then a person is asked
    PermanentError    quarantined with its message
    RetryableError    retry_wait with a backoff
    anything else     a bug or a surprise: retried a few times, then quarantined
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, TypeVar

import structlog

from ..core import policy
from ..core.lifecycle import FINAL, Event, State
from ..errors import (
    ChecksumMismatch,
    FileChanged,
    FileVanished,
    LedgerUnwritable,
    PermanentError,
    RetryableError,
    ShuttingDown,
)
from ..ledger import FileRecord, StaleTransition
from .context import StepContext
from .ending import discard_unregistered

log = structlog.get_logger("edge_agent.steps")

# Unexpected exceptions (bugs, surprises) are retried a few times, then quarantined.
MAX_UNEXPECTED = 5
# A destination that keeps handing back a wrong checksum is not tried forever.
MAX_BAD_COPIES = 3

T = TypeVar("T")


def guarded(rec: FileRecord, ctx: StepContext, work: Callable[[FileRecord, StepContext], T]) -> T | None:
    """Run `work` for `rec`; a failure becomes its move (see the module docstring). Returns what
    `work` returned, None after a failure. A ledger that cannot be written, or a shutdown, is
    raised: nothing can be recorded, and the runner pauses."""
    try:
        return work(rec, ctx)
    except (ShuttingDown, LedgerUnwritable):
        raise
    except StaleTransition as exc:
        log.info("step outdated", file_id=rec.id, rule=rec.rule, path=rec.relpath, detail=str(exc))
    except FileChanged as exc:
        _outdated_is_fine(rec, lambda: changed(rec, ctx, str(exc)))
    except FileVanished as exc:
        _outdated_is_fine(rec, lambda: vanished(rec, ctx, str(exc)))
    except ChecksumMismatch as exc:
        # a storage that hands back other bytes or another checksum than were sent: retried a
        # bounded number of times (the copy is removed first), then a person is asked
        event = Event.FAILED_PERMANENT if rec.attempts + 1 >= MAX_BAD_COPIES else Event.FAILED_RETRYABLE
        fail(rec, ctx, event, f"storage checksum mismatch: {exc}")
    except PermanentError as exc:
        fail(rec, ctx, Event.FAILED_PERMANENT, str(exc))
    except RetryableError as exc:
        fail(rec, ctx, Event.FAILED_RETRYABLE, str(exc))
    except Exception as exc:  # noqa: BLE001 - the daemon must outlive its own bugs
        log.error("unexpected error", file_id=rec.id, rule=rec.rule, path=rec.relpath,
                  did=rec.name and rec.did, exc_info=True)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"unexpected {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        event = Event.FAILED_PERMANENT if rec.attempts + 1 >= MAX_UNEXPECTED else Event.FAILED_RETRYABLE
        fail(rec, ctx, event, reason)
    return None


def _outdated_is_fine(rec: FileRecord, record: Callable[[], None]) -> None:
    """Record what a step found (the file changed, or went), unless its row moved meanwhile (or is
    another agent's now): that is the step outdated, as in guarded(), not a failure of the batch."""
    try:
        record()
    except StaleTransition as exc:
        log.info("step outdated", file_id=rec.id, rule=rec.rule, path=rec.relpath, detail=str(exc))


def raising(problem: Exception) -> Callable[[FileRecord, StepContext], None]:
    """A piece of work that fails with `problem` (an outcome a bulk call gave for one file of a batch),
    for guarded() to turn into that file's move."""
    def fail(rec: FileRecord, ctx: StepContext) -> None:
        raise problem
    return fail


def fail(rec: FileRecord, ctx: StepContext, event: Event, reason: str, **updates: Any) -> None:
    """Record a failure (`event`: failed_retryable with a backoff, failed_permanent, or a rewrite of
    copies) with its reason and the attempt count."""
    attempts = rec.attempts + 1
    if event is not Event.FAILED_PERMANENT:
        r = ctx.settings.retry
        delay = policy.backoff_seconds(attempts, r.base_seconds, r.max_seconds, r.jitter, ctx.rand())
        updates.setdefault("next_at", ctx.clock() + delay)
        detail = {"reason": reason, "attempt": attempts, "retry_in_s": round(delay, 1)}
    else:
        detail = {"reason": reason, "attempt": attempts}
    try:
        move_failed(rec, ctx, event, detail, attempts=attempts, reason=reason, **updates)
    except StaleTransition:
        pass


def move_failed(rec: FileRecord, ctx: StepContext, event: Event, detail: dict[str, Any] | None = None,
                **updates: Any) -> FileRecord:
    """ctx.move for a failure. A step may have moved its row on before it failed (confirm records
    the confirmation, then deletes at once): the failure is recorded where the row is now.
    Returns the record it was moved from."""
    try:
        ctx.move(rec, event, detail, **updates)
        return rec
    except StaleTransition:
        now = ctx.ledger.get(rec.id)
        if now.state is rec.state or now.state in FINAL:
            raise
    ctx.move(now, event, detail, **updates)
    return now


def changed(rec: FileRecord, ctx: StepContext, reason: str) -> None:
    """The file changed under the step: before hashing it waits for completion again; after, this
    version ends (the watcher discovers the new content as a new version)."""
    if rec.blake3 is None:
        move_failed(rec, ctx, Event.CHANGED, {"reason": reason})
    else:
        ended = move_failed(rec, ctx, Event.SUPERSEDED, {"reason": reason}, reason=reason)
        discard_unregistered(ended, ctx)


def vanished(rec: FileRecord, ctx: StepContext, reason: str) -> None:
    """Renamed (the new name is discovered as a file of its own) or removed by someone else: this
    version cannot be sent, and retrying cannot bring it back. Said loudly."""
    stage = "hashing" if rec.state is State.COMPLETE else "its copies were written"
    why = f"vanished before {stage} (renamed or removed by someone else): {reason}"
    log.warning("file vanished", file_id=rec.id, rule=rec.rule, path=rec.relpath, reason=why)
    ended = move_failed(rec, ctx, Event.SUPERSEDED, {"reason": why}, reason=why)
    discard_unregistered(ended, ctx)
