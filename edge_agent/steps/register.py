"""hashed --register--> registered: the DID, its dataset (and container) and metadata exist in the
lake's catalogue. A batch of files (one rule, one dataset) is registered by the catalogue in bulk and
their moves committed together; a file the catalogue refuses fails alone. Idempotent: a DID that
exists with these bytes is success."""

from __future__ import annotations

from typing import Any, Sequence

from .. import nights
from ..core.lifecycle import Event
from ..failpoints import hit
from ..ledger import FileRecord
from .context import StepContext
from .failures import guarded, raising
from .lookup import lake_files, outcomes


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    """After it each file of the batch is REGISTERED, or failed into its wait with its own reason."""
    batch = nights.refiled_if_late(batch, ctx.settings, ctx.ledger)
    files = lake_files(batch, ctx)
    todo = [rec for rec in batch if rec.id in files]
    if not todo:
        return
    registered = outcomes(lambda: ctx.catalogue.register_many([files[rec.id] for rec in todo]), len(todo))
    hit("after_register")
    moves: list[tuple[FileRecord, Event, dict[str, Any] | None, dict[str, Any]]] = []
    for rec, problem in zip(todo, registered, strict=True):
        if problem is None:
            moves.append((rec, Event.REGISTERED, None, {"attempts": 0}))
        else:
            guarded(rec, ctx, raising(problem))
    ctx.move_many(moves)
