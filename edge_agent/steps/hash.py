"""complete --hash--> hashed: the file is read once. blake3, adler32 (and md5) are taken with the
stat they belong to; where the agent writes the copies, the first copy is written in the same pass
(a file is read once per upload, the first one included). The version's lake name is decided and
bound to its content in the same commit, with its FITS header, extractor and sidecar metadata
(a rule's extractor plug-in that takes the stream is fed the same read)."""

from __future__ import annotations

import json
from typing import Sequence

import structlog

from .. import nights
from ..core import policy
from ..core.lifecycle import CopyState, Event, NameState
from ..errors import (
    DestinationOccupied,
    FileChanged,
    FileVanished,
    PermanentError,
    RetryableError,
    SourceUnreadable,
)
from ..failpoints import hit
from ..hashing import Consumer, Digests
from ..lake.base import LakeFile, Target
from ..ledger import FileRecord, NameConflict, WrittenCopy
from ..nightbook import NightClosed
from ..transfer.base import Expected
from ..transfer.tee import read_once
from . import inplace, metadata, naming
from .context import StepContext
from .extract import Extraction
from .failures import guarded

log = structlog.get_logger("edge_agent.steps")

def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    if len(batch) > 1:
        ctx.catalogue.foresee([f for rec in batch if (f := _foreseen(rec, ctx)) is not None])
    for rec in batch:
        guarded(rec, ctx, hash_one)


def _foreseen(rec: FileRecord, ctx: StepContext) -> LakeFile | None:
    """The name `rec` will most likely be given (from the stat recorded at completion), for asking
    the catalogue about a whole job at once; None where it cannot be told now."""
    try:
        rule = ctx.rule(rec)
        if rec.mtime_ns is None or rec.size is None:
            return None
        fields = policy.naming_fields(rec.relpath, rec.mtime_ns / 1e9, rec.rule, rule.night_rollover_hour, rule.tz)
        return ctx.unhashed_file(rec, rule.scope, policy.render(rule.name_template, fields), rec.size)
    except Exception:  # noqa: BLE001 - a hint only: hash_one renders the name again, and says what is wrong
        return None


def hash_one(rec: FileRecord, ctx: StepContext) -> None:
    """After it the version is HASHED: its digests, stat, name and metadata are committed (and its
    first copy, if written in the pass, recorded 'sent')."""
    rule = ctx.rule(rec)
    local = ctx.local(rec)
    if rule.inject == "register":
        inplace.link(rec, ctx, local)
    before = local.stat()
    if before is None:
        raise FileVanished(f"{rec.relpath} is gone or no longer a regular file")
    if not ctx.recorded_stat(rec).same_file(before):
        raise FileChanged(f"{rec.relpath} changed after it was judged complete")
    if before.size == 0 and not rule.allow_empty:
        raise PermanentError("zero-byte file: a failed write? (set allow_empty = true for this rule "
                             f"to upload empty files, then `edge-agent retry {rec.id}`)")
    fields = policy.naming_fields(rec.relpath, before.mtime_ns / 1e9, rec.rule,
                                  rule.night_rollover_hour, rule.tz)
    name = policy.render(rule.name_template, fields)
    problem = policy.name_problem(name, ctx.catalogue.name_pattern)
    if problem:
        raise PermanentError(f"{problem} (from name_template {rule.name_template!r}); rename the "
                             "file or change the template")
    dataset = policy.render(rule.dataset_template, fields) if rule.dataset_template else None
    if dataset:
        problem = policy.name_problem(dataset, ctx.catalogue.name_pattern)
        if problem:
            raise PermanentError(f"dataset {problem} (from dataset_template {rule.dataset_template!r})")
    # a night closed out takes no more files: the move says so (NightClosed), in its own commit
    night = nights.entered(rule, fields["night"]) if dataset else None
    scan = metadata.fits_scan(rec, ctx)
    extraction = Extraction(rec, ctx, before.size)
    also: list[Consumer] = ([scan] if scan is not None else []) + extraction.also
    rendered = name
    first = naming.first_target(rec, ctx, name, before.size)
    d = None
    if first is not None:
        try:
            d = _send_first(rec, ctx, first, before.size, also)
        except DestinationOccupied:
            # bytes appeared at the URL after it was found empty (another writer): never replaced;
            # the name is decided by content instead
            first = None
            for c in also:
                c.reset()
    if d is None:
        d = _read(rec, ctx, also)
    try:
        # a command (or a plug-in that reads the file itself) runs on the file as it lies now: the
        # stat after it also says the file it read is the one hashed
        extraction.finish()
        after = local.stat()
        if after != before or d.size != before.size:
            raise FileChanged(f"{rec.relpath} changed while it was being read")
        if first is None:
            name = naming.decide_name(rec, ctx, rule.scope, rendered, d)
        meta = metadata.gather(rec, ctx, scan, extraction)
    except BaseException:
        if first is not None:
            _discard_first(rec, ctx, rule.scope, name, first)
        raise
    # the first copy is recorded with the move, in its commit: a move that fails leaves the copy
    # as a crash right after the write would (under this version's reservation, found again)
    written = () if first is None else (WrittenCopy(
        first.location, first.url, d.size, d.adler32, CopyState.SENT,
        (rec.state, Event.COPY_WRITTEN, {"location": first.location, "url": first.url, "with_hashing": True})),)
    # ctime (which nobody can set back) and device identify this version from now on, with
    # inode, size and mtime: the deletion compares them all
    assert after is not None
    said: dict[str, str] = {}
    for attempt in range(5):
        try:
            hashed = {"blake3": d.blake3, "adler32": d.adler32, "size": d.size, **said}
            if extraction.skipped:
                hashed["extractor_skipped"] = extraction.skipped
            ctx.move(rec, Event.HASHED, hashed,
                     copies=written, blake3=d.blake3, adler32=d.adler32, md5=d.md5, size=d.size, scope=rule.scope,
                     name=name, dataset=dataset, metadata=json.dumps(meta), attempts=0,
                     ctime_ns=after.ctime_ns, dev=after.dev, night=night)
            hit("after_hashed")
            return
        except NightClosed:
            if attempt == 4:
                raise RetryableError(f"night {dataset} was closed while {rec.relpath} was hashed") from None
            assert dataset is not None
            late = nights.late_for(ctx.ledger, rec.rule, said.get("late_of", dataset))
            log.warning("late file: its night is closed, it goes to a dataset of its own", file_id=rec.id,
                        rule=rec.rule, path=rec.relpath, night=dataset, dataset=late)
            said = {"late_of": said.get("late_of", dataset)}
            dataset = late
        except NameConflict as exc:
            # another version took the name between the look and the commit (files hashed side
            # by side whose templates render one name): decided again with the digests in hand,
            # without reading the file again
            if first is not None or attempt == 4:
                raise RetryableError(f"the name {rule.scope}:{name} was taken meanwhile ({exc})") from None
            name = naming.decide_name(rec, ctx, rule.scope, rendered, d)


def _read(rec: FileRecord, ctx: StepContext, also: Sequence[Consumer]) -> Digests:
    """Hash without sending: the lake copies from the buffer, or the name must be decided first."""
    rule = ctx.rule(rec)
    try:
        with read_once(ctx.local(rec), md5=rule.md5, chunk_size=ctx.settings.chunk_mb << 20,
                       pace=lambda n: ctx.hooks.bytes_hashed(rec.rule, n), also=also) as tee:
            return tee.drain()
    except SourceUnreadable as exc:
        raise PermanentError(f"{exc} (fix the permissions, then `edge-agent retry {rec.id}`)") from None
    except OSError as exc:   # opening: the way to the file failed (a read error is already RetryableError)
        raise RetryableError(f"reading {rec.relpath} failed: {exc.strerror}") from None


def _send_first(rec: FileRecord, ctx: StepContext, t: Target, size: int, also: Sequence[Consumer]) -> Digests:
    rule = ctx.rule(rec)
    pace = ctx.pacer(rec.rule, t.location)

    def pace_and_count(n: int) -> None:
        pace(n)
        ctx.hooks.bytes_hashed(rec.rule, n)

    ctx.check_claim(rec)
    started = ctx.clock()
    try:
        # reserved while its URL was empty: only a leftover of this version's own upload cut short
        # (naming.first_target told) is replaced; anything else there now is DestinationOccupied
        d = ctx.transport(t).put(ctx.local(rec), t.url,
                                 Expected(size, None, want_md5=rule.md5, may_replace=t.replace_leftover),
                                 pace_and_count, also=also)
    except SourceUnreadable as exc:
        raise PermanentError(f"{exc} (fix the permissions, then `edge-agent retry {rec.id}`)") from None
    hit("after_first_put")
    took = max(ctx.clock() - started, 1e-6)
    log.debug("first copy written while hashing", file_id=rec.id, location=t.location,
              mb_per_s=round(d.size / took / 1e6, 1))
    return d


def _discard_first(rec: FileRecord, ctx: StepContext, scope: str, name: str, t: Target) -> None:
    """A first copy of bytes that will not be hashed into a version (changed, corrupt): removed
    and the reservation given up; if the removal fails the name stays reserved (nobody else
    writes under it; a later attempt of this version replaces it). Only while the name is still
    this version's unbound reservation and (a shared ledger) this agent's claim holds: an agent that
    stalled here past its lease may find the copy counted by the agent that took the file over
    (it bound the name to these very bytes): then it stays."""
    if (scope, name, NameState.WRITING) not in {(s, n, st) for s, n, st, _ in ctx.ledger.names_owned(rec.id)}:
        log.info("first copy kept: its name is no longer this attempt's reservation", file_id=rec.id,
                 did=f"{scope}:{name}")
        return
    ctx.check_claim(rec)
    try:
        ctx.transport(t).delete(t.url)
    except Exception as exc:  # noqa: BLE001 - the name stays this version's: nobody counts it
        log.warning("could not remove a first copy that will not be registered", file_id=rec.id,
                    location=t.location, error=str(exc))
        return
    ctx.ledger.drop_reservation(scope, name, rec.id)
