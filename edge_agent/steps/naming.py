"""Which lake name a version gets, and when it may write under it. A name belongs to one content:
it is reserved (committed) before any byte is written under it and bound to the version's blake3
when it is hashed. Bytes a version did not write are never replaced."""

from __future__ import annotations

import dataclasses

import structlog

from ..core import policy
from ..core.lifecycle import NameState
from ..errors import PermanentError, RetryableError
from ..hashing import Digests
from ..lake.base import Records, Target
from ..ledger import FileRecord
from .context import StepContext

log = structlog.get_logger("edge_agent.steps")


def first_target(rec: FileRecord, ctx: StepContext, name: str, size: int) -> Target | None:
    """Where the first copy can be written in the hashing pass, or None to hash alone.

    Only where the agent writes the copies, and only under a name nobody holds: not another
    version in the ledger, not the lake's catalogue, not the destination itself (a catalogue
    lost or rebuilt must not let an older night's copy be overwritten). The name is then
    reserved in the ledger, committed, before the first byte is written: two files whose
    templates give one name never write to one URL. A name in use is decided after hashing,
    by content (the same bytes keep the name, other bytes get a versioned one), at the cost of
    a second read for that file.
    """
    scope = ctx.rule(rec).scope
    hold = ctx.ledger.name_hold(scope, name)
    resumed = hold is not None and hold.owner == rec.id and hold.state is NameState.WRITING
    if hold is not None and not resumed:
        return None
    targets = ctx.catalogue.targets(ctx.unhashed_file(rec, scope, name, size))
    if not targets:
        return None
    first = targets[0]
    if resumed:
        assert hold is not None
        # the URL must be the one reserved (the destinations may have changed since); what lies
        # there now is this version's to replace only if it is a leftover: nothing, or, on a
        # storage where an upload cut short leaves a partial object, an object the lake's
        # catalogue does not record (another writer registers what it counts). Else it is
        # decided by content, after hashing alone.
        if hold.first_url != first.url:
            return None
        if ctx.transport(first).exists(first.url):
            if not _leftover_at(ctx, first, scope, name):
                return None
            return dataclasses.replace(first, replace_leftover=True)
        return first
    if not ctx.catalogue.name_free(scope, name) or any(ctx.transport(t).exists(t.url) for t in targets):
        return None
    if not ctx.ledger.reserve_name(scope, name, rec.id, first.url):
        return None
    # reserved while its URL was empty: whatever lies there now is this version's own
    return first


def _leftover_at(ctx: StepContext, t: Target, scope: str, name: str) -> bool:
    """Is what lies at `t.url` (reserved by this version for its first copy) a leftover of an
    upload cut short? Only where the storage can leave one, and the catalogue records no copy
    of the name there."""
    return ctx.transport(t).leaves_partials and t.location not in ctx.catalogue.recorded_locations(scope, name)


def decide_name(rec: FileRecord, ctx: StepContext, scope: str, base: str, d: Digests) -> str:
    """The name of a version hashed alone: the rendered one if it is free or holds these very
    bytes, else the first free versioned one. Bound to the content by the HASHED transition."""
    for name in policy.name_candidates(base, rec.version):
        hold = ctx.ledger.name_hold(scope, name)
        if hold is not None:
            if hold.owner == rec.id and hold.state is NameState.WRITING:
                # reserved by this version before an earlier attempt failed: still only where no
                # destination holds other bytes (whoever wrote them: a crash of this version mid-put
                # and another writer look the same)
                if not _destinations_hold_other(rec, ctx, scope, name, d):
                    return name
                continue
            if hold.state is NameState.BOUND and hold.blake3 == d.blake3:
                return name      # the same bytes: the copies under it count for both
            if hold.state is not NameState.BOUND and not hold.owner_final:
                raise RetryableError(f"the name {scope}:{name} is being written by file {hold.owner}; "
                                     "decided once its content is known")
            continue
        if not _destinations_hold_other(rec, ctx, scope, name, d) and not _lake_holds_other(rec, ctx, scope, name, d):
            return name
    raise PermanentError(f"no free name for {rec.relpath} among the versions of {scope}:{base}")


def _destinations_hold_other(rec: FileRecord, ctx: StepContext, scope: str, name: str, d: Digests) -> bool:
    """Does a destination already hold other bytes under scope:name (something this ledger never
    gave that name: a lost catalogue, another agent, a partial copy)? Those bytes are never
    replaced."""
    for t in ctx.catalogue.targets(ctx.unhashed_file(rec, scope, name, d.size)):
        # a match on size and adler32 alone proves nothing (adler32 collides easily on small
        # files): bytes nobody in this ledger wrote count as these only by a strong digest
        transport = ctx.transport(t)
        if transport.exists(t.url) and not transport.same_bytes(t.url, d):
            log.warning("name in use at a destination by bytes not known to be these; taking another",
                        file_id=rec.id, did=f"{scope}:{name}", location=t.location)
            return True
    return False


def _lake_holds_other(rec: FileRecord, ctx: StepContext, scope: str, name: str, d: Digests) -> bool:
    """Does the lake's catalogue hold scope:name with other content (an older night's file whose
    copies lie elsewhere, a ledger lost or new)? Registering under it would be refused for good:
    the next versioned name is taken instead. (The same size and adler32: registration compares
    them again, with md5 where both have one.)"""
    if ctx.catalogue.name_free(scope, name) or not isinstance(ctx.catalogue, Records):
        return False
    listed = ctx.catalogue.lookup([(scope, name)]).get((scope, name))
    if listed is None:
        return False
    if listed.size == d.size and policy.normalise_adler32(listed.adler32) == policy.normalise_adler32(d.adler32):
        return False
    log.warning("name held in the lake by other content; taking another", file_id=rec.id, did=f"{scope}:{name}",
                lake_size=listed.size, lake_adler32=listed.adler32)
    return True
