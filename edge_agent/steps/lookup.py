"""What the catalogue says of a batch of files, asked once for all of them: the state of the copies
requested and the replicas it records (the confirm and delete steps decide on it)."""

from __future__ import annotations

from typing import Sequence

from ..lake.base import CopiesState, LakeFile, RecordedReplica
from ..ledger import FileRecord
from .context import StepContext
from .failures import guarded, raising

Asked = dict[int, tuple[LakeFile, CopiesState | None, list[RecordedReplica]]]


def ask(batch: Sequence[FileRecord], ctx: StepContext) -> Asked:
    """What the catalogue says of the batch's files, asked in bulk: the state of the copies requested
    and the replicas it records. A failure of the whole call fails every file with it."""
    files: dict[int, LakeFile] = {}
    for rec in batch:
        f = guarded(rec, ctx, lambda r, x: x.lake_file(r))
        if f is not None:
            files[rec.id] = f
    recs = [rec for rec in batch if rec.id in files]
    try:
        states = ctx.catalogue.copies_states([(files[rec.id], rec.lake_ref) for rec in recs])
        recorded = ctx.catalogue.recorded_many([files[rec.id] for rec in recs])
    except Exception as exc:  # noqa: BLE001 - each file fails with the call (retried, or quarantined)
        for rec in recs:
            guarded(rec, ctx, raising(exc))
        return {}
    return {rec.id: (files[rec.id], st, rr) for rec, st, rr in zip(recs, states, recorded, strict=True)}
