"""What the catalogue says of a batch of files, asked once for all of them: the state of the copies
requested and the replicas it records (the confirm and delete steps decide on it)."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from ..errors import RetryableError
from ..lake.base import CopiesState, LakeFile, RecordedReplica
from ..ledger import FileRecord
from .context import StepContext
from .failures import guarded, raising

T = TypeVar("T")


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
