"""A copy the agent wrote that went bad or missing after it was written, while the buffer still
holds the file, is written again: the version goes back to REGISTERED after a backoff."""

from __future__ import annotations

import structlog

from ..core import policy
from ..core.lifecycle import CopyState, Event
from ..errors import PermanentError
from ..lake.base import LakeFile
from ..ledger import FileRecord
from .context import StepContext
from .failures import MAX_BAD_COPIES, fail

log = structlog.get_logger("edge_agent.steps")


def reseed(rec: FileRecord, ctx: StepContext, f: LakeFile, c: policy.Confirmation) -> bool:
    """Copies the agent wrote that now hold other bytes or are gone, while the buffer still holds
    the file: said loudly (replica_lost) and written again from the buffer, a bounded number of
    rounds. A bad copy the lake made is the lake's to mend: reported, never counted. True if
    the file was sent back to be rewritten."""
    own = {t.location: t.url for t in ctx.catalogue.targets(f)}
    if not own:
        return False
    good = {r.location for r in c.good}
    rewrite: dict[str, tuple[str, CopyState, str]] = {}     # location -> (url, copy state, why)
    for r, why in c.bad:
        if r.location in own and r.location not in good and r.available and r.size is not None:
            # the URL the agent writes to (a catalogue's PFN for it may be spelled otherwise)
            rewrite[r.location] = (own[r.location], CopyState.BAD, why)
    # gone: listed, but the storage says it holds nothing; or (the local lake) not there at all.
    # A storage that did not answer proves nothing either way: waited for, never rewritten.
    listed = {r.location: r for r in (*c.good, *(r for r, _ in c.bad))}
    for row in ctx.ledger.replicas(rec.id):
        loc = row["location"]
        r = listed.get(loc)
        if row["state"] == CopyState.WRITTEN and loc in own and loc not in good and loc not in rewrite \
                and (r is None or r.gone):
            rewrite[loc] = (own[loc], CopyState.LOST, "the copy is gone from the destination")
    if not rewrite:
        return False
    why = "; ".join(f"{loc}: {w}" for loc, (_, _, w) in sorted(rewrite.items()))
    # attempts restart at each successful transfer, so earlier rounds are counted from the history
    rounds = sum(1 for h in ctx.ledger.history(rec.id) if h["event"] == Event.REPLICA_LOST
                 and (h["detail"] or {}).get("rewrite"))
    for loc, (url, kind, _) in rewrite.items():
        ctx.ledger.record_replica(rec.id, loc, url, None, None, kind)
    ctx.ledger.note(rec.id, rec.state, Event.REPLICA_LOST, {"reason": why, "rewrite": sorted(rewrite)})
    log.warning("a copy the agent wrote is bad or gone; writing it again from the buffer", file_id=rec.id,
                did=rec.did, reason=why)
    if rounds + 1 >= MAX_BAD_COPIES:
        raise PermanentError(f"copies keep failing verification: {why}")
    kinds = {kind for _, kind, _ in rewrite.values()}
    lead = ("copy failed verification, rewriting" if CopyState.BAD in kinds
            else "copy lost, rewriting from the buffer")
    fail(rec, ctx, Event.REWRITE_COPIES, f"{lead}: {why}")
    return True
