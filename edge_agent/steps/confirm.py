"""transferred --confirm--> confirmed: the lake holds at least N replicas, in N distinct places, whose
size and adler32 equal the local file's (and the lake's request for copies is done). Not yet: look
again later, loudly once overdue or stuck. A copy the agent wrote that went bad or missing is
written again from the buffer, a bounded number of rounds."""

from __future__ import annotations

from typing import Any, Sequence

import structlog

from ..core import policy
from ..core.lifecycle import AT_ONCE, Event
from ..lake.base import CopiesState, LakeFile, RecordedReplica
from ..ledger import FileRecord
from . import delete, lookup, rewrite
from .context import StepContext
from .failures import guarded

log = structlog.get_logger("edge_agent.steps")


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    """After it each file of the batch is CONFIRMED (and handed to the delete step at once), or still
    TRANSFERRED with its next look scheduled, or failed into its wait. The catalogue is asked once for
    the batch; the confirmations are committed together."""
    asked = lookup.ask(batch, ctx)
    confirmed: dict[int, policy.Confirmation] = {}
    moves: list[tuple[FileRecord, Event, dict[str, Any] | None, dict[str, Any]]] = []
    for rec in batch:
        if rec.id not in asked:
            continue
        f, state, recorded = asked[rec.id]
        out = guarded(rec, ctx, lambda r, x, f=f, state=state, recorded=recorded: judge(r, x, f, state, recorded))
        if out is not None:
            evidence, c = out
            moves.append((rec, Event.CONFIRMED, evidence, {"attempts": 0, "reason": None}))
            confirmed[rec.id] = c
    now = ctx.move_many(moves)
    for rec, *_ in moves:
        new = now.get(rec.id)
        if new is not None and new.state in AT_ONCE:
            # the delete step runs at once on the evidence just taken: the lake is not asked twice
            guarded(new, ctx, lambda r, x, c=confirmed[rec.id]: delete.decide(r, x, c))


def judge(rec: FileRecord, ctx: StepContext, f: LakeFile, state: CopiesState | None,
          recorded: list[RecordedReplica]) -> tuple[dict[str, Any], policy.Confirmation] | None:
    """The confirmation of one file, from what the catalogue said: (evidence, confirmation) when it
    holds at least N verified replicas (the caller commits it), else None, with the file's next look
    scheduled and any warning (stuck, overdue, a replica that does not verify) recorded, or the file
    sent back to write a bad or lost copy again."""
    if state is CopiesState.MISSING:
        # the rule expired or was deleted before the copies were confirmed: ask again
        rec, state, recorded = lookup.ask_again(rec, ctx, f)
    c = policy.judge_replicas(ctx.replicas(f, recorded), f.size, f.adler32)
    evidence: dict[str, Any] = {
        "replicas": [{"location": r.location, "size": r.size, "adler32": r.adler32,
                      "adler32_from_catalogue": r.adler32_from_catalogue} for r in c.good],
        "not_counted": [{"location": r.location, "why": why} for r, why in c.bad]}
    if rec.lake_ref:
        evidence["rule"] = {"id": rec.lake_ref, "state": state}
    if state not in (None, CopiesState.OK):
        _not_yet(rec, ctx, f, c, state, evidence)
        return None
    if c.count >= f.copies:
        return evidence, c
    if rewrite.reseed(rec, ctx, f, c):
        return None
    _not_yet(rec, ctx, f, c, state, evidence)
    return None


def _not_yet(rec: FileRecord, ctx: StepContext, f: LakeFile, c: policy.Confirmation, state: CopiesState | None,
             evidence: dict[str, Any]) -> None:
    """Not confirmed yet: look again later, and say so loudly once it is overdue or stuck."""
    s = ctx.settings
    now = ctx.clock()
    ctx.ledger.set_next_at(rec.id, now + s.confirm_interval_seconds)
    deadline = (s.lake.rucio.stuck_after_hours if s.lake.rucio else s.lake.stuck_after_hours) * 3600
    overdue = now - rec.updated_at > deadline
    mismatched = [f"{r.location}: {w}" for r, w in c.bad if r.available and r.size is not None]
    if mismatched:
        why = "a replica does not match the local file: " + "; ".join(mismatched)
        if rec.reason != why:
            ctx.ledger.flag(rec.id, why)
            ctx.ledger.note(rec.id, rec.state, Event.REPLICA_LOST, {"reason": why, **evidence})
            log.warning("replica does not verify; local file kept", file_id=rec.id, did=rec.did, reason=why)
    elif state in (CopiesState.STUCK, CopiesState.SUSPENDED) or overdue:
        why = (f"rule {rec.lake_ref} is {state}" if state in (CopiesState.STUCK, CopiesState.SUSPENDED) else
               f"rule {rec.lake_ref} still {state or 'not OK'} after {(now - rec.updated_at) / 3600:.1f} h")
        why += f"; {c.count} of {f.copies} replicas confirmed"
        if rec.reason != why:
            ctx.ledger.flag(rec.id, why)
            ctx.ledger.note(rec.id, rec.state, Event.STUCK, {"reason": why, **evidence})
            log.warning("replication stuck", file_id=rec.id, did=rec.did, reason=why)
    else:
        log.info("waiting for replicas", file_id=rec.id, did=rec.did, confirmed=c.count, copies=f.copies,
                 rule_state=state, not_counted=evidence["not_counted"])
