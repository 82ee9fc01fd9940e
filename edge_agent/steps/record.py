"""copied --record--> transferred: the copies the agent wrote are recorded in the lake's catalogue
(replicas available) and the lake is asked for the copies it makes (a replication rule), for a
batch of files (one rule, one dataset) in bulk calls; their moves are committed together. A crash
repeats the batch: recording a replica again and asking again for a rule that exists are success."""

from __future__ import annotations

from typing import Any, Sequence

from ..core.lifecycle import CopyState, Event
from ..failpoints import hit
from ..ledger import FileRecord
from .context import StepContext
from .failures import guarded, raising
from .lookup import lake_files, outcomes


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    """After it each file of the batch is TRANSFERRED (its copies in the catalogue, its request for
    copies made and its reference kept), or failed into its wait with its own reason."""
    files = lake_files(batch, ctx)
    todo = [rec for rec in batch if rec.id in files]
    copies = {rec.id: [(r["location"], r["url"]) for r in ctx.ledger.replicas(rec.id) if r["state"] == CopyState.SENT]
              for rec in todo}
    owners = [rec.id for rec in todo for _ in copies[rec.id]]
    asked = [(files[rec.id], loc, url) for rec in todo for loc, url in copies[rec.id]]
    added = outcomes(lambda: ctx.catalogue.add_replicas_many(asked), len(asked))
    hit("after_add_replica")
    problem: dict[int, Exception] = {}
    for rid, outcome in zip(owners, added, strict=True):
        if outcome is not None:
            problem.setdefault(rid, outcome)
    recorded = [rec for rec in todo if rec.id not in problem]
    ctx.ledger.mark_copies([(rec.id, loc) for rec in recorded for loc, _ in copies[rec.id]], CopyState.WRITTEN)
    # what the requests will be made on (Rucio: a batch's dataset) is kept before they are made:
    # a crash repeats them on the same datasets, for the same files
    asking = [files[rec.id] for rec in recorded]
    kept = [rec.lake_ref for rec in recorded]
    try:
        plans = ctx.catalogue.plan_copies(asking, kept)
    except Exception:  # noqa: BLE001 - no plan: each file is asked a rule of its own (its trouble told then)
        plans = kept
    ctx.ledger.set_lake_refs([(rec.id, p) for rec, p in zip(recorded, plans, strict=True) if p != rec.lake_ref])
    hit("after_plan")
    refs = outcomes(lambda: ctx.catalogue.request_copies_many(asking, plans), len(recorded))
    hit("after_rule")
    moves: list[tuple[FileRecord, Event, dict[str, Any] | None, dict[str, Any]]] = []
    for rec, ref in zip(recorded, refs, strict=True):
        if isinstance(ref, Exception):
            problem[rec.id] = ref
            continue
        moves.append((rec, Event.TRANSFERRED, {"lake_ref": ref} if ref else None,
                      {"attempts": 0, "next_at": 0, "lake_ref": ref}))
    for rec in todo:
        if rec.id in problem:
            guarded(rec, ctx, raising(problem[rec.id]))
    ctx.move_many(moves)
