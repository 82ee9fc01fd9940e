"""What a version leaves when it ends (superseded: changed, renamed, vanished) is cleaned up: a
first copy that never reached the lake's records, a deletion cut short, the buffer name of a
version never registered. Best effort; what is left is retried at the next start."""

from __future__ import annotations

import structlog

from ..core.lifecycle import RESUMABLE, CopyState, NameState, State
from ..ledger import FileRecord
from ..localfs import finish_deleting
from ..settings import DeletePolicy
from . import inplace
from .context import StepContext

log = structlog.get_logger("edge_agent.steps")


def discard_unregistered(rec: FileRecord, ctx: StepContext) -> None:
    """An ended version's first copy that never reached the lake's records: removed, best effort,
    and only while no other version counts it (one with the same bytes may share the name, and
    may have been deleted locally on the strength of that copy). Then the name is free again.
    Register in place: the agent's own name for a version never registered goes too (one that
    was registered keeps it: the lake's replica of it lies there)."""
    before = rec.resume_state if rec.state in RESUMABLE else rec.state
    try:
        if before in (State.DISCOVERED, State.COMPLETE, State.HASHED):
            inplace.unlink(rec, ctx)
        elif before is State.CONFIRMED and (rule := ctx.settings.rules.get(rec.rule)) and rule.inject == "register":
            # its copies were confirmed: the buffer copy goes as at its deletion (the DAQ's new
            # file under that path is another version and is never reached)
            inplace.release(rec, ctx, path_unlinked=False)
    except Exception as exc:  # noqa: BLE001 - best effort: a stale link is space, not loss
        log.warning("could not drop the buffer copy of an ended version", file_id=rec.id, error=str(exc))
    if before is State.CONFIRMED:
        _finish_deleting(rec, ctx)
    for scope, name, state, first_url in ctx.ledger.names_owned(rec.id):
        rows = [r for r in ctx.ledger.replicas(rec.id) if r["state"] == CopyState.SENT]
        if state is NameState.BOUND and not rows:
            continue      # nothing of its own left unregistered: the name stays bound
        if not ctx.ledger.begin_removal(scope, name, rec.id):
            log.info("first copy kept: another version counts it", file_id=rec.id, did=f"{scope}:{name}")
            continue
        if rec.rule not in ctx.settings.rules:
            continue
        f = ctx.unhashed_file(rec, scope, name, rec.size or 0)
        try:
            # Only a copy this version is known to have written (recorded 'sent' after its put)
            # is removed, and never one the catalogue lists (another agent's version may have
            # counted and registered the same bytes). An unbound reservation removes nothing:
            # whatever lies at its URL may be another writer's (a crash mid-put leaves dark data).
            urls = {r["url"] for r in rows}
            recorded = ctx.catalogue.recorded_locations(scope, name) if urls or first_url else set()
            for t in ctx.catalogue.targets(f):
                transport = ctx.transport(t)
                mine = t.url in urls and t.location not in recorded
                partial = not rows and t.url == first_url and transport.leaves_partials and t.location not in recorded
                # asked again right before each removal: an agent sharing the ledger may have
                # finished this removal meanwhile, and a new version written its own copy here
                if (mine or partial) and not ctx.ledger.removing_by(scope, name, rec.id):
                    log.info("clean-up of an ended version finished elsewhere", file_id=rec.id,
                             did=f"{scope}:{name}")
                    break
                if mine:
                    transport.delete(t.url)
                    ctx.ledger.record_replica(rec.id, t.location, t.url, None, None, CopyState.REMOVED)
                elif partial:
                    # a first upload cut short may have left a partial object at the one URL
                    # this version reserved: nobody records it, nobody counts it
                    transport.delete(t.url)
        except Exception as exc:  # noqa: BLE001 - best effort: the name stays 'removing' and is retried
            log.warning("could not remove an unregistered first copy", file_id=rec.id, error=str(exc))
            continue
        ctx.ledger.finish_removal(scope, name, rec.id)


def _finish_deleting(rec: FileRecord, ctx: StepContext) -> None:
    """A confirmed version that ended while its deletion was cut short (a crash between the
    rename and the unlink, then a new file under its path): its own leftover, which nobody
    else will ever look at, goes if it still holds exactly its confirmed bytes (put back
    under a name the watcher sees otherwise, or where nothing may be deleted now: a dry run,
    deletion policy 'never'). The path itself is never touched."""
    rule = ctx.settings.rules.get(rec.rule)
    if rule is None or rec.inode is None:
        return
    delete = not ctx.settings.dry_run and rule.delete is not DeletePolicy.NEVER
    try:
        outcome = finish_deleting(ctx.local(rec), ctx.recorded_stat(rec), ctx.recheck(rec), delete)
    except Exception as exc:  # noqa: BLE001 - best effort: the leftover is space, its copies confirmed
        log.warning("could not finish the deletion of an ended version", file_id=rec.id, error=str(exc))
        return
    if outcome != "gone":
        log.info("deletion of an ended version finished", file_id=rec.id, path=rec.relpath, outcome=outcome)
