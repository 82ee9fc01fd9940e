"""hashed --register--> registered: the DID, its dataset (and container) and metadata exist in the
lake's catalogue. Idempotent: a DID that exists with these bytes is success."""

from __future__ import annotations

from typing import Sequence

from ..core.lifecycle import Event
from ..failpoints import hit
from ..ledger import FileRecord
from .context import StepContext
from .failures import guarded


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    for rec in batch:
        guarded(rec, ctx, register_one)


def register_one(rec: FileRecord, ctx: StepContext) -> None:
    """After it the version is REGISTERED (the catalogue raises PermanentError for a DID that holds
    other bytes)."""
    ctx.catalogue.register(ctx.lake_file(rec))
    hit("after_register")
    ctx.move(rec, Event.REGISTERED, attempts=0)
