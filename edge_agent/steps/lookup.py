"""What the catalogue says of a batch of files, asked once for all of them: the state of the copies
requested and the replicas it records (the confirm and delete steps decide on it)."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import structlog

from ..core.lifecycle import Event
from ..errors import RetryableError
from ..lake.base import CopiesState, LakeFile, RecordedReplica
from ..ledger import FileRecord
from .context import StepContext
from .failures import guarded, raising

T = TypeVar("T")
log = structlog.get_logger("edge_agent.steps")


def lake_files(batch: Sequence[FileRecord], ctx: StepContext) -> dict[int, LakeFile]:
    """The lake's view of each file of the batch, by file id; a file whose view cannot be made fails
    alone (and is left out)."""
    files: dict[int, LakeFile] = {}
    for rec in batch:
        f = guarded(rec, ctx, lambda r, x: x.lake_file(r))
        if f is not None:
            files[rec.id] = f
    return files


def outcomes(call: Callable[[], Sequence[T]], n: int) -> list[T | Exception]:
    """A bulk call's outcome for each of its n items; a failure of the call as a whole is each
    item's outcome (the step fails every file with it)."""
    try:
        return list(call())
    except Exception as exc:  # noqa: BLE001 - sorted by the step, file by file
        return [exc] * n


Asked = dict[int, tuple[LakeFile, CopiesState | None, list[RecordedReplica]]]


def ask(batch: Sequence[FileRecord], ctx: StepContext) -> Asked:
    """What the catalogue says of the batch's files, asked in bulk: the state of the copies requested
    and the replicas it records. A failure of the whole call fails every file with it."""
    files = lake_files(batch, ctx)
    recs = [rec for rec in batch if rec.id in files]
    try:
        states = ctx.catalogue.copies_states([(files[rec.id], rec.lake_ref) for rec in recs])
        recorded = ctx.catalogue.recorded_many([files[rec.id] for rec in recs])
    except RetryableError as exc:
        for rec in recs:                 # the catalogue cannot answer now: every file waits for it
            guarded(rec, ctx, raising(exc))
        return {}
    except Exception as exc:  # noqa: BLE001 - one file's trouble must not hold back the others
        if len(recs) == 1:
            guarded(recs[0], ctx, raising(exc))
            return {}
        # asked again file by file: the one the catalogue refuses (or a bug trips on) fails alone,
        # instead of every file of the batch being quarantined with it
        return {k: v for rec in recs for k, v in ask([rec], ctx).items()}
    return {rec.id: (files[rec.id], st, rr) for rec, st, rr in zip(recs, states, recorded, strict=True)}


def ask_again(rec: FileRecord, ctx: StepContext, f: LakeFile
              ) -> tuple[FileRecord, CopiesState | None, list[RecordedReplica]]:
    """The request for copies is gone (the rule expired or was deleted, or the file has no lock
    under its batch's rule): asked again and kept, then what the catalogue says now. Whoever
    judges copies with a MISSING request (confirmation, a deferred deletion) asks again: nobody
    else would, and the lake would hold the copies unprotected while the file waited for ever."""
    ref = ctx.catalogue.request_copies(f)
    ctx.ledger.set_lake_ref(rec.id, ref)
    ctx.ledger.note(rec.id, rec.state, Event.RULE_RECREATED, {"old": rec.lake_ref, "new": ref})
    log.warning("replication rule gone; asked again", file_id=rec.id, did=rec.did, old=rec.lake_ref, new=ref)
    rec = ctx.ledger.get(rec.id)
    return rec, ctx.catalogue.copies_state(f, ref), ctx.catalogue.recorded(f)
