"""registered --transfer--> copied: the copies the agent writes itself are written, each one read from
the buffer and checked in the same pass, and recorded in the ledger ('sent'). Recording them in the
catalogue and asking the lake for its copies is the record step's, in batches."""

from __future__ import annotations

from typing import Sequence

from ..core.lifecycle import CopyState, Event
from ..errors import RetryableError
from ..failpoints import hit
from ..lake.base import Target
from ..ledger import FileRecord, WrittenCopy
from ..transfer.base import Expected
from .context import StepContext
from .failures import guarded


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    for rec in batch:
        guarded(rec, ctx, transfer_one)


def transfer_one(rec: FileRecord, ctx: StepContext) -> None:
    """After it the version is COPIED: every copy the agent writes is written, verified and recorded
    'sent' in the ledger (the first one may have been written while hashing)."""
    f = ctx.lake_file(rec)
    recorded = {r["location"]: r for r in ctx.ledger.replicas(rec.id)}
    targets = ctx.catalogue.targets(f)

    def recorded_as(t: Target, *states: CopyState) -> bool:
        r = recorded.get(t.location)
        return r is not None and r["state"] in states and r["url"] == t.url

    todo = [t for t in targets if not recorded_as(t, CopyState.SENT, CopyState.WRITTEN)]
    if todo:
        writer = ctx.ledger.claim_writer(f.scope, f.name, rec.id)
        if writer != rec.id:
            # another version with these very bytes writes the copies under this name: they count
            # for this one too once written; meanwhile nothing is written (nor removed) here
            for t in todo:
                transport = ctx.transport(t)
                there = transport.stat(t.url)
                if there is None or not transport.describes_copy(there, f.size, f.adler32, by_size=True):
                    raise RetryableError(f"the copies of {f.did} are being written by file {writer} "
                                         "(the same bytes); they count for this file once written")
    # A URL is this version's to overwrite only where it wrote before (a bad or lost copy, a
    # crash mid-write) or found it empty and recorded so before writing: anything else there is
    # never replaced (an identical copy counts; other bytes are DestinationOccupied).
    own = {t.location for t in todo if (r := recorded.get(t.location)) is not None and r["url"] == t.url}
    last: list[WrittenCopy] = []
    for t in todo:
        transport = ctx.transport(t)
        found_empty = False
        if t.location not in own and not transport.exists(t.url):
            # asked right before its own upload (an earlier one may have taken minutes)
            ctx.ledger.record_replicas(rec.id, [(t.location, t.url)], CopyState.WRITING)
            own.add(t.location)
            found_empty = True
        # what a version with these bytes wrote there (the name's writer) is recognised by size and
        # adler32; anything else only by a strong digest, or it is DestinationOccupied
        expected = Expected(f.size, f.blake3, f.adler32, f.md5, may_replace=t.location in own,
                            known_writer=ctx.ledger.copy_written(f.scope, f.name, t.location, t.url),
                            found_empty=found_empty)
        ctx.check_claim(rec)
        started = ctx.clock()
        got = transport.put(ctx.local(rec), t.url, expected, ctx.pacer(rec.rule, t.location))
        hit("after_put")
        took = max(ctx.clock() - started, 1e-6)
        copy = WrittenCopy(t.location, t.url, got.size, got.adler32, CopyState.SENT, (
            rec.state, Event.COPY_WRITTEN, {"location": t.location, "url": t.url, "seconds": round(took, 3),
                                            "mb_per_s": round(got.size / took / 1e6, 1)}))
        if t is todo[-1]:
            last.append(copy)     # recorded with the move, in its commit
        else:
            ctx.ledger.record_replica(rec.id, copy.location, copy.url, copy.size, copy.adler32, copy.state,
                                      note=copy.note)
    ctx.move(rec, Event.COPIED, copies=last, attempts=0, next_at=0)
