"""confirmed --delete--> deleted: the local file goes by a guarded unlink, only while the lake still
confirms N verified replicas and the file is unchanged since it was hashed, and when the rule's
deletion policy says so (immediate, keep N hours, never; dry run deletes nothing). Where the rule
writes custody receipts, the file's receipt is written durably first (steps/receipt.py)."""

from __future__ import annotations

from typing import Any, Sequence

import structlog

from ..core import policy, receipts
from ..core.lifecycle import Event
from ..errors import FileChanged, FileVanished, PermanentError
from ..failpoints import hit
from ..lake.base import CopiesState, LakeFile, RecordedReplica
from ..ledger import FileRecord
from ..localfs import guarded_unlink, leftover
from ..settings import Completion, DeletePolicy
from . import inplace, lookup, receipt, rewrite
from .context import StepContext
from .failures import changed, guarded

log = structlog.get_logger("edge_agent.steps")


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    """Confirmed files whose deletion was deferred: the lake is asked again (in bulk) right before."""
    asked = lookup.ask(batch, ctx)
    for rec in batch:
        if rec.id in asked:
            f, state, recorded = asked[rec.id]
            guarded(rec, ctx, lambda r, x, f=f, state=state, recorded=recorded: recheck_and_decide(r, x, f, state, recorded))


def recheck_and_decide(rec: FileRecord, ctx: StepContext, f: LakeFile, state: CopiesState | None,
                       recorded: list[RecordedReplica]) -> None:
    """A confirmed file whose deletion was deferred, with what the catalogue says now: its replicas
    are verified again and the deletion decided on them. A request for copies gone meanwhile (a rule
    whose lifetime ran out during `keep`) is asked again first: the copies stay protected."""
    if state is CopiesState.MISSING:
        rec, state, recorded = lookup.ask_again(rec, ctx, f)
    c = policy.judge_replicas(ctx.replicas(f, recorded), f.size, f.adler32)
    if state not in (None, CopiesState.OK):
        c = policy.Confirmation((), tuple((r, f"rule is {state}") for r in c.good))
    if c.count < f.copies and state in (None, CopiesState.OK) and rewrite.reseed(rec, ctx, f, c):
        return
    if c.count < f.copies:
        why = (f"held: {c.count} of {f.copies} replicas confirmed now, after confirmation earlier; "
               + "; ".join(f"{r.location}: {w}" for r, w in c.bad))
        if rec.reason != why:
            ctx.ledger.flag(rec.id, why)
            ctx.ledger.note(rec.id, rec.state, Event.REPLICA_LOST, {"reason": why})
            log.warning("replica no longer verifies; local file kept", file_id=rec.id, did=rec.did, reason=why)
    elif rec.reason:
        ctx.ledger.flag(rec.id, None)
    decide(rec, ctx, c)


def decide(rec: FileRecord, ctx: StepContext, c: policy.Confirmation) -> None:
    """With the lake's confirmation `c` in hand: after it the file is DELETED (and its buffer replica
    released), or kept with its next look scheduled, or its version ended because it changed."""
    rule = ctx.rule(rec)
    local = ctx.local(rec)
    recorded = ctx.recorded_stat(rec)
    # a crash inside guarded_unlink leaves the file under this version's "deleting" name: still
    # ours to finish, whatever was published under the path since (its ctime is our rename's)
    current = leftover(local, recorded) or local.stat()
    kept = 0.0
    key = (rec.id, rec.confirmed_at)     # a copy written again is confirmed anew: kept anew
    if rule.delete is DeletePolicy.KEEP:
        # the keep period runs on the monotonic clock once this process has seen the file: a
        # wall-clock step forward must not delete it early (nor a step back hold it longer)
        mono = ctx.monotonic()
        since = ctx.confirmed_mono.setdefault(key, policy.confirmed_since(rec.confirmed_at, ctx.clock(), mono))
        kept = mono - since
    verdict, why = policy.deletion_verdict(rule.delete.value, rule.keep_hours, kept, c, rule.copies, recorded,
                                           current, ctx.settings.dry_run)
    if verdict != "wait":
        ctx.confirmed_mono.pop(key, None)
    evidence: dict[str, Any] = {
        "replicas": [{"location": r.location, "size": r.size, "adler32": r.adler32, "url": r.url,
                      "adler32_from_catalogue": r.adler32_from_catalogue} for r in c.good],
        "local_adler32": rec.adler32, "local_size": rec.size}
    # the writers are looked up by the file as this host sees it: the device the hashing agent
    # recorded is another host's numbering on a shared buffer
    if verdict == "delete" and current is not None and current.dev is not None \
            and ctx.open_writers(current.dev, current.inode):
        # a writer that paused longer than the whole upload would write into a deleted file
        verdict, why = "wait", "a process still holds the file open for writing"
        log.warning("not deleting: file still open for writing", file_id=rec.id, path=rec.relpath)
    receipt_at = None
    if receipts.due(verdict, c.count, rule.copies, rule.delete.value, ctx.settings.dry_run):
        # before the local file may go, never after: no receipt, no deletion (a receipt that cannot
        # be written raises, and the file stays). A crash between the two leaves both, the receipt
        # saying "confirmed": the next look writes nothing new and deletes.
        going = verdict in ("delete", "gone")
        receipt_at = receipt.write(rec, ctx, c, receipts.TO_DELETE if going else receipts.KEPT)
        hit("after_receipt")
    if rule.receipts != "none":
        evidence["receipt"] = receipt_at
    if verdict == "delete":
        # The DAQ's name goes first (guarded): a file published under it at that instant is kept
        # and nothing is released. The buffer replica (register in place) is registered under the
        # agent's own name for this version, released after, then that name removed: a crash in
        # between finds the file gone and finishes ("gone"); the reaper never reaches the DAQ's name.
        ctx.check_claim(rec, ask_ledger=True)
        try:
            outcome = guarded_unlink(local, recorded, ctx.recheck(rec))
        except PermissionError as exc:
            raise PermanentError(f"cannot delete {rec.relpath}: {exc.strerror} (the agent needs write "
                                 "permission on its directory; the copies are confirmed: fix it, then "
                                 f"`edge-agent retry {rec.id}`)") from None
        hit("after_unlink")
        if outcome == "changed":
            # this version is confirmed in the lake: its own buffer copy may go, the new file stays
            inplace.release(rec, ctx, path_unlinked=False)
            raise FileChanged("the local file changed just before deletion; kept")
        inplace.release(rec, ctx)
        ctx.move(rec, Event.DELETED, {**evidence, "outcome": outcome, "why": why})
        _remove_companions(rec, ctx)
    elif verdict == "gone":
        inplace.release(rec, ctx)
        ctx.move(rec, Event.DELETED, {**evidence, "outcome": "gone", "why": why})
        _remove_companions(rec, ctx)
    elif verdict == "changed":
        changed(rec, ctx, why)
    elif verdict == "keep":
        # never delete: the file stays confirmed; look again rarely (policy may change on restart)
        ctx.ledger.set_next_at(rec.id, ctx.clock() + (3600 if rule.delete is DeletePolicy.NEVER
                                                      else ctx.settings.confirm_interval_seconds))
        log.info("kept", file_id=rec.id, did=rec.did, why=why)
    else:  # wait
        wait = ctx.settings.confirm_interval_seconds
        if rule.delete is DeletePolicy.KEEP:
            wait = max(wait, rule.keep_hours * 3600 - kept)
        ctx.ledger.set_next_at(rec.id, ctx.clock() + wait)


def _remove_companions(rec: FileRecord, ctx: StepContext) -> None:
    """The marker and sidecar files of a deleted file go too, where the rule says so."""
    rule = ctx.rule(rec)
    if not rule.delete_markers:
        return
    for p, suffix in ((Completion.MARKER, rule.marker_suffix), (Completion.SIDECAR, rule.sidecar_suffix)):
        if p in rule.completion:
            try:
                ctx.local(rec).with_suffix(suffix).unlink()
            except FileVanished as exc:      # a directory on the way is now a symlink: not followed
                log.warning("could not remove companion file", path=rec.relpath + suffix, error=str(exc))
            except OSError as exc:
                log.warning("could not remove companion file", path=rec.relpath + suffix, error=exc.strerror)
