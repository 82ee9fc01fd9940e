"""The steps of a file's life, each one effect followed by one committed transition.

    complete    --hash-->      hashed       (one read: blake3, adler32, md5; where the agent writes
                                             the copies, the first copy is written in that pass)
    hashed      --register-->  registered   (DID, dataset, metadata in the lake catalogue)
    registered  --transfer-->  transferred  (copies written and verified in-pass, replicas
                                             recorded, copies requested)
    transferred --confirm-->   confirmed    (>= N replicas whose size and adler32 match)
    confirmed   --delete-->    deleted      (guarded unlink of the unchanged local file)

A crash between an effect and its transition repeats only that effect, and every
effect is idempotent. Failures are sorted by the error taxonomy: retryable ones wait
out a backoff, permanent ones quarantine the file with the reason.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import structlog

from .core import policy
from .core.lifecycle import FINAL, Event, State
from .errors import (
    DestinationOccupied,
    ChecksumMismatch,
    FileChanged,
    FileVanished,
    LedgerUnwritable,
    PermanentError,
    RetryableError,
    ShuttingDown,
    SourceUnreadable,
)
from .failpoints import hit
from .fits import FitsScan
from .hashing import Digests, hash_stream
from .lake.base import Catalogue, CopiesState, LakeFile, Target
from .ledger import FileRecord, Ledger, NameConflict, StaleTransition
from .localfs import (
    INPLACE_DIR,
    LocalFile,
    finish_deleting,
    guarded_unlink,
    inplace_link,
    leftover,
    link_in_place,
    unlink_in_place,
)
from .settings import Completion, DeletePolicy, Settings
from .transfer.base import Expected, Pacer
from .transfer.registry import Transports
from .verify import Checks, replicas

log = structlog.get_logger("edge_agent.pipeline")

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz")
# Unexpected exceptions (bugs, surprises) are retried a few times, then quarantined.
MAX_UNEXPECTED = 5
# A destination that keeps handing back a wrong checksum is not tried forever.
MAX_BAD_COPIES = 3


@dataclass
class Hooks:
    """What the pipeline tells the outside world (metrics, throughput); all optional."""
    bytes_hashed: Callable[[str, int], None] = lambda rule, n: None
    bytes_sent: Callable[[str, str, int], None] = lambda rule, loc, n: None
    transition: Callable[[FileRecord], None] = lambda rec: None


class Pipeline:
    def __init__(self, settings: Settings, ledger: Ledger, lake: Catalogue, transports: Transports, pace: Pacer,
                 hooks: Hooks | None = None, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 open_writers: Callable[[int, int], int | None] = lambda dev, ino: None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.ledger = ledger
        self.lake = lake
        self.transports = transports
        self.pace = pace
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.monotonic = monotonic
        # file id -> monotonic time of its confirmation (policy.confirmed_since), for `keep`
        self._confirmed_mono: dict[tuple[int, float | None], float] = {}
        self.rand = rand
        self.open_writers = open_writers

    # ------------------------------------------------------------ dispatch
    def run_step(self, rec: FileRecord) -> None:
        """Run the step that leads out of rec.state, translating failures into transitions."""
        step = {State.COMPLETE: self.hash, State.HASHED: self.register, State.REGISTERED: self.transfer,
                State.TRANSFERRED: self.confirm, State.CONFIRMED: self.delete}[rec.state]
        bound = log.bind(file_id=rec.id, rule=rec.rule, path=rec.relpath, did=rec.name and rec.did)
        try:
            step(rec)
        except (ShuttingDown, LedgerUnwritable):
            raise   # a failure cannot be recorded in a ledger that cannot be written: the runner pauses
        except StaleTransition as exc:
            bound.info("step outdated", detail=str(exc))
        except FileChanged as exc:
            self._changed(rec, str(exc))
        except FileVanished as exc:
            self._vanished(rec, str(exc))
        except ChecksumMismatch as exc:
            # a storage that hands back other bytes or another checksum than were sent: retried a
            # bounded number of times (the copy is removed first), then a person is asked
            event = Event.FAILED_PERMANENT if rec.attempts + 1 >= MAX_BAD_COPIES else Event.FAILED_RETRYABLE
            self._fail(rec, event, f"storage checksum mismatch: {exc}")
        except PermanentError as exc:
            self._fail(rec, Event.FAILED_PERMANENT, str(exc))
        except RetryableError as exc:
            self._fail(rec, Event.FAILED_RETRYABLE, str(exc))
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive its own bugs
            bound.error("unexpected error", exc_info=True)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            reason = f"unexpected {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
            event = Event.FAILED_PERMANENT if rec.attempts + 1 >= MAX_UNEXPECTED else Event.FAILED_RETRYABLE
            self._fail(rec, event, reason)

    def _move(self, rec: FileRecord, event: Event, detail: dict[str, Any] | None = None,
              **updates: Any) -> FileRecord:
        new = self.ledger.transition(rec.id, rec.state, event, detail, **updates)
        fields = {"file_id": rec.id, "rule": rec.rule, "path": rec.relpath, "state": str(new.state),
                  "did": new.name and new.did}
        # a detail key may name something else than the line's own field (the evidence's "rule" is the
        # lake's replication rule): it is logged as detail_<key>, since a clash would raise after the commit
        fields.update({(f"detail_{k}" if k in fields else k): v for k, v in (detail or {}).items()})
        log.info(str(event), **fields)
        self.hooks.transition(new)
        return new

    def _fail(self, rec: FileRecord, event: Event, reason: str, **updates: Any) -> None:
        attempts = rec.attempts + 1
        if event is Event.FAILED_RETRYABLE:
            r = self.s.retry
            delay = policy.backoff_seconds(attempts, r.base_seconds, r.max_seconds, r.jitter, self.rand())
            updates.setdefault("next_at", self.clock() + delay)
            detail = {"reason": reason, "attempt": attempts, "retry_in_s": round(delay, 1)}
        else:
            detail = {"reason": reason, "attempt": attempts}
        try:
            self._move_failed(rec, event, detail, attempts=attempts, reason=reason, **updates)
        except StaleTransition:
            pass

    def _move_failed(self, rec: FileRecord, event: Event, detail: dict[str, Any] | None = None,
                     **updates: Any) -> FileRecord:
        """_move for a failure. A step may have moved its row on before it failed (confirm records
        the confirmation, then deletes at once): the failure is recorded where the row is now.
        Returns the record it was moved from."""
        try:
            self._move(rec, event, detail, **updates)
            return rec
        except StaleTransition:
            now = self.ledger.get(rec.id)
            if now.state is rec.state or now.state in FINAL:
                raise
        self._move(now, event, detail, **updates)
        return now

    def _changed(self, rec: FileRecord, reason: str) -> None:
        if rec.blake3 is None:
            self._move_failed(rec, Event.CHANGED, {"reason": reason})
        else:
            # this version's evidence no longer describes the file: end it; the watcher
            # discovers the new content as a new version
            ended = self._move_failed(rec, Event.SUPERSEDED, {"reason": reason}, reason=reason)
            self.discard_unregistered(ended)

    def discard_unregistered(self, rec: FileRecord) -> None:
        """An ended version's first copy that never reached the lake's records: removed, best effort,
        and only while no other version counts it (one with the same bytes may share the name, and
        may have been deleted locally on the strength of that copy). Then the name is free again.
        Register in place: the agent's own name for a version never registered goes too (one that
        was registered keeps it: the lake's replica of it lies there)."""
        before = rec.resume_state if rec.state in (State.RETRY_WAIT, State.QUARANTINED) else rec.state
        try:
            if before in (State.DISCOVERED, State.COMPLETE, State.HASHED):
                self._unlink_in_place(rec)
            elif before is State.CONFIRMED and (rule := self.s.rules.get(rec.rule)) and rule.inject == "register":
                # its copies were confirmed: the buffer copy goes as at its deletion (the DAQ's new
                # file under that path is another version and is never reached)
                self._release(rec, path_unlinked=False)
        except Exception as exc:  # noqa: BLE001 - best effort: a stale link is space, not loss
            log.warning("could not drop the buffer copy of an ended version", file_id=rec.id, error=str(exc))
        if before is State.CONFIRMED:
            self._finish_deleting(rec)
        for scope, name, state, first_url in self.ledger.names_owned(rec.id):
            rows = [r for r in self.ledger.replicas(rec.id) if r["state"] == "sent"]
            if state == "bound" and not rows:
                continue      # nothing of its own left unregistered: the name stays bound
            if not self.ledger.begin_removal(scope, name, rec.id):
                log.info("first copy kept: another version counts it", file_id=rec.id, did=f"{scope}:{name}")
                continue
            rule = self.s.rules.get(rec.rule)
            if rule is None:
                continue
            f = LakeFile.unhashed(rec.rule, scope, name, rec.size or 0, rule.copies, tuple(rule.destinations),
                                  rec.fspath)
            try:
                # Only a copy this version is known to have written (recorded 'sent' after its put)
                # is removed, and never one the catalogue lists (another agent's version may have
                # counted and registered the same bytes). An unbound reservation removes nothing:
                # whatever lies at its URL may be another writer's (a crash mid-put leaves dark data).
                urls = {r["url"] for r in rows}
                recorded = self.lake.recorded_locations(scope, name) if urls or first_url else set()
                for t in self.lake.targets(f):
                    if t.url in urls and t.location not in recorded:
                        self.transports.for_url(t.url).delete(t.url)
                        self.ledger.record_replica(rec.id, t.location, t.url, None, None, "removed")
                    elif not rows and t.url == first_url and self.transports.for_url(t.url).leaves_partials \
                            and t.location not in recorded:
                        # a first upload cut short may have left a partial object at the one URL
                        # this version reserved: nobody records it, nobody counts it
                        self.transports.for_url(t.url).delete(t.url)
            except Exception as exc:  # noqa: BLE001 - best effort: the name stays 'removing' and is retried
                log.warning("could not remove an unregistered first copy", file_id=rec.id, error=str(exc))
                continue
            self.ledger.finish_removal(scope, name, rec.id)

    def _finish_deleting(self, rec: FileRecord) -> None:
        """A confirmed version that ended while its deletion was cut short (a crash between the
        rename and the unlink, then a new file under its path): its own leftover, which nobody
        else will ever look at, goes if it still holds exactly its confirmed bytes (put back
        under a name the watcher sees otherwise, or where nothing may be deleted now: a dry run,
        deletion policy 'never'). The path itself is never touched."""
        rule = self.s.rules.get(rec.rule)
        if rule is None or rec.inode is None:
            return
        delete = not self.s.dry_run and rule.delete is not DeletePolicy.NEVER
        try:
            outcome = finish_deleting(self._local(rec), self._recorded_stat(rec), self._recheck(rec), delete)
        except Exception as exc:  # noqa: BLE001 - best effort: the leftover is space, its copies confirmed
            log.warning("could not finish the deletion of an ended version", file_id=rec.id, error=str(exc))
            return
        if outcome != "gone":
            log.info("deletion of an ended version finished", file_id=rec.id, path=rec.relpath, outcome=outcome)

    def _vanished(self, rec: FileRecord, reason: str) -> None:
        # Renamed (the new name is discovered as a file of its own) or removed by someone else:
        # either way this version cannot be sent, and retrying cannot bring it back. Said loudly.
        stage = "hashing" if rec.state is State.COMPLETE else "its copies were written"
        why = f"vanished before {stage} (renamed or removed by someone else): {reason}"
        log.warning("file vanished", file_id=rec.id, rule=rec.rule, path=rec.relpath, reason=why)
        ended = self._move_failed(rec, Event.SUPERSEDED, {"reason": why}, reason=why)
        self.discard_unregistered(ended)

    # ------------------------------------------------------------ helpers
    def lake_file(self, rec: FileRecord) -> LakeFile:
        rule = self.s.rules[rec.rule]
        assert rec.scope and rec.name and rec.adler32 and rec.blake3 and rec.size is not None
        container = None
        if rule.container_template and rec.mtime_ns is not None:
            container = policy.render(rule.container_template, policy.naming_fields(
                rec.relpath, rec.mtime_ns / 1e9, rec.rule, rule.night_rollover_hour, rule.tz))
        buffer_path = None
        if rule.inject == "register":
            link = inplace_link(rule.directory, rec.id)
            if link.stat() is not None:
                buffer_path = os.fsdecode(link.path)
        return LakeFile(rule=rec.rule, scope=rec.scope, name=rec.name, dataset=rec.dataset, size=rec.size,
                        adler32=rec.adler32, md5=rec.md5, blake3=rec.blake3, copies=rule.copies,
                        destinations=tuple(rule.destinations), local_path=rec.fspath, metadata=rec.meta,
                        container=container, buffer_path=buffer_path)

    def replicas(self, f: LakeFile) -> list[policy.Replica]:
        """The copies of `f` the catalogue records, as their storage holds them (verify.replicas)."""
        return replicas(self.lake.recorded(f), f, self.transports, Checks.of(self.s))

    def _recorded_stat(self, rec: FileRecord) -> policy.LocalStat:
        assert rec.inode is not None and rec.size is not None and rec.mtime_ns is not None
        # ctime_ns is None for a row hashed by an older agent: compared as before, without it
        return policy.LocalStat(rec.inode, rec.size, rec.mtime_ns, rec.ctime_ns, rec.dev)

    def _local(self, rec: FileRecord) -> LocalFile:
        """The file, reached from its rule's directory without following a symlink below it."""
        return LocalFile.below(self.s.rules[rec.rule].directory, rec.path)

    # ------------------------------------------------------------ steps
    def hash(self, rec: FileRecord) -> None:
        """Read the file once: hash it and, where the agent writes the copies, write the first
        copy in the same pass (a file is read once per upload, the first one included)."""
        rule = self.s.rules[rec.rule]
        local = self._local(rec)
        if rule.inject == "register":
            self._link_in_place(rec, local)
        before = local.stat()
        if before is None:
            raise FileVanished(f"{rec.relpath} is gone or no longer a regular file")
        if not self._recorded_stat(rec).same_file(before):
            raise FileChanged(f"{rec.relpath} changed after it was judged complete")
        if before.size == 0 and not rule.allow_empty:
            raise PermanentError("zero-byte file: a failed write? (set allow_empty = true for this rule "
                                 f"to upload empty files, then `edge-agent retry {rec.id}`)")
        fields = policy.naming_fields(rec.relpath, before.mtime_ns / 1e9, rec.rule,
                                      rule.night_rollover_hour, rule.tz)
        name = policy.render(rule.name_template, fields)
        problem = policy.name_problem(name, self.lake.name_pattern)
        if problem:
            raise PermanentError(f"{problem} (from name_template {rule.name_template!r}); rename the "
                                 "file or change the template")
        dataset = policy.render(rule.dataset_template, fields) if rule.dataset_template else None
        if dataset:
            problem = policy.name_problem(dataset, self.lake.name_pattern)
            if problem:
                raise PermanentError(f"dataset {problem} (from dataset_template {rule.dataset_template!r})")
        scan = FitsScan() if rule.fits == "auto" and rec.relpath.lower().endswith(FITS_SUFFIXES) else None
        rendered = name
        first = self._first_target(rec, name, before.size)
        d = None
        if first is not None:
            try:
                d = self._send_first(rec, first, before.size, scan)
            except DestinationOccupied:
                # bytes appeared at the URL after it was found empty (another writer): never replaced;
                # the name is decided by content instead
                first = None
                if scan is not None:
                    scan.reset()
        if d is None:
            d = self._read(rec, scan)
        try:
            after = local.stat()
            if after != before or d.size != before.size:
                raise FileChanged(f"{rec.relpath} changed while it was being read")
            if first is None:
                name = self._decide_name(rec, rule.scope, rendered, d)
            meta = {**rule.metadata, **self._fits_metadata(rec, scan), **self._sidecar(rec)}
        except BaseException:
            if first is not None:
                self._discard_first(rec, rule.scope, name, first)
            raise
        if first is not None:
            self.ledger.record_replica(rec.id, first.location, first.url, d.size, d.adler32, "sent", note=(
                rec.state, "copy_written", {"location": first.location, "url": first.url,
                                            "with_hashing": True}))
        # ctime (which nobody can set back) and device identify this version from now on, with
        # inode, size and mtime: the deletion compares them all
        assert after is not None
        for attempt in range(5):
            try:
                self._move(rec, Event.HASHED, {"blake3": d.blake3, "adler32": d.adler32, "size": d.size},
                           blake3=d.blake3, adler32=d.adler32, md5=d.md5, size=d.size, scope=rule.scope,
                           name=name, dataset=dataset, metadata=json.dumps(meta), attempts=0,
                           ctime_ns=after.ctime_ns, dev=after.dev)
                return
            except NameConflict as exc:
                # another version took the name between the look and the commit (files hashed side
                # by side whose templates render one name): decided again with the digests in hand,
                # without reading the file again
                if first is not None or attempt == 4:
                    raise RetryableError(f"the name {rule.scope}:{name} was taken meanwhile ({exc})") from None
                name = self._decide_name(rec, rule.scope, rendered, d)

    def _link_in_place(self, rec: FileRecord, local: LocalFile) -> None:
        """Register in place: the version gets the agent's own name in the buffer before it is hashed
        (the link is part of the stat recorded); its buffer replica is registered under that name."""
        try:
            link_in_place(local, inplace_link(self.s.rules[rec.rule].directory, rec.id))
        except FileNotFoundError:
            raise FileVanished(f"{rec.relpath} is gone or no longer a regular file") from None
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS):
                raise PermanentError(f"cannot give {rec.relpath} the agent's own name in the buffer (a hard link "
                                     f"in {os.fsdecode(INPLACE_DIR)}): {exc.strerror}; register in place needs "
                                     "a buffer filesystem with hard links that the agent may write") from None
            raise RetryableError(f"cannot link {rec.relpath} in place: {exc.strerror}") from None

    def _release(self, rec: FileRecord, path_unlinked: bool = True) -> None:
        """The lake forgets the buffer copy (register in place), then the agent's own name for it goes.

        A version registered at the DAQ's own path (hashed by an older agent, without its own name)
        is released only once that path was unlinked by the guarded unlink: released with a new file
        at the path, the reaper would remove that file."""
        f = self.lake_file(rec)
        rule = self.s.rules.get(rec.rule)
        if rule is not None and rule.inject == "register" and f.buffer_path is None and not path_unlinked:
            log.warning("buffer replica kept: it is registered at the DAQ's own path, where a new file lies",
                        file_id=rec.id, did=rec.did, path=rec.relpath)
            return
        self.lake.release(f)
        hit("after_release")
        self._unlink_in_place(rec)

    def _unlink_in_place(self, rec: FileRecord) -> None:
        rule = self.s.rules.get(rec.rule)
        if rule is None or rule.inject != "register" or rec.inode is None:
            return
        unlink_in_place(inplace_link(rule.directory, rec.id), self._recorded_stat(rec))

    def _first_target(self, rec: FileRecord, name: str, size: int) -> Target | None:
        """Where the first copy can be written in the hashing pass, or None to hash alone.

        Only where the agent writes the copies, and only under a name nobody holds: not another
        version in the ledger, not the lake's catalogue, not the destination itself (a catalogue
        lost or rebuilt must not let an older night's copy be overwritten). The name is then
        reserved in the ledger, committed, before the first byte is written: two files whose
        templates give one name never write to one URL. A name in use is decided after hashing,
        by content (the same bytes keep the name, other bytes get a versioned one), at the cost of
        a second read for that file.
        """
        rule = self.s.rules[rec.rule]
        hold = self.ledger.name_hold(rule.scope, name)
        resumed = hold is not None and hold.owner == rec.id and hold.state == "writing"
        if hold is not None and not resumed:
            return None
        f = LakeFile.unhashed(rec.rule, rule.scope, name, size, rule.copies, tuple(rule.destinations),
                              rec.fspath)
        targets = self.lake.targets(f)
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
            if self.transports.for_url(first.url).exists(first.url):
                if not self._leftover_at(first, rule.scope, name):
                    return None
                return dataclasses.replace(first, replace_leftover=True)
            return first
        if not self.lake.name_free(rule.scope, name) or any(self.transports.for_url(t.url).exists(t.url) for t in targets):
            return None
        if not self.ledger.reserve_name(rule.scope, name, rec.id, first.url):
            return None
        # reserved while its URL was empty: whatever lies there now is this version's own
        return first

    def _leftover_at(self, t: Target, scope: str, name: str) -> bool:
        """Is what lies at `t.url` (reserved by this version for its first copy) a leftover of an
        upload cut short? Only where the storage can leave one, and the catalogue records no copy
        of the name there."""
        return self.transports.for_url(t.url).leaves_partials and t.location not in self.lake.recorded_locations(scope, name)

    def _decide_name(self, rec: FileRecord, scope: str, base: str, d: Digests) -> str:
        """The name of a version hashed alone: the rendered one if it is free or holds these very
        bytes, else the first free versioned one. Bound to the content by the HASHED transition."""
        for name in policy.name_candidates(base, rec.version):
            hold = self.ledger.name_hold(scope, name)
            if hold is not None:
                if hold.owner == rec.id and hold.state == "writing":
                    # reserved by this version before an earlier attempt failed: still only where no
                    # destination holds other bytes (whoever wrote them: a crash of this version mid-put
                    # and another writer look the same)
                    if not self._destinations_hold_other(rec, scope, name, d):
                        return name
                    continue
                if hold.state == "bound" and hold.blake3 == d.blake3:
                    return name      # the same bytes: the copies under it count for both
                if hold.state != "bound" and not hold.owner_final:
                    raise RetryableError(f"the name {scope}:{name} is being written by file {hold.owner}; "
                                         "decided once its content is known")
                continue
            if not self._destinations_hold_other(rec, scope, name, d):
                return name
        raise PermanentError(f"no free name for {rec.relpath} among the versions of {scope}:{base}")

    def _destinations_hold_other(self, rec: FileRecord, scope: str, name: str, d: Digests) -> bool:
        """Does a destination already hold other bytes under scope:name (something this ledger never
        gave that name: a lost catalogue, another agent, a partial copy)? Those bytes are never
        replaced."""
        rule = self.s.rules[rec.rule]
        f = LakeFile.unhashed(rec.rule, scope, name, d.size, rule.copies, tuple(rule.destinations), rec.fspath)
        for t in self.lake.targets(f):
            # a match on size and adler32 alone proves nothing (adler32 collides easily on small
            # files): bytes nobody in this ledger wrote count as these only by a strong digest
            transport = self.transports.for_url(t.url)
            if transport.exists(t.url) and not transport.same_bytes(t.url, d):
                log.warning("name in use at a destination by bytes not known to be these; taking another",
                            file_id=rec.id, did=f"{scope}:{name}", location=t.location)
                return True
        return False

    def _read(self, rec: FileRecord, scan: FitsScan | None) -> Digests:
        """Hash without sending: the lake copies from the buffer, or the name must be decided first."""
        rule = self.s.rules[rec.rule]
        try:
            with self._local(rec).open() as fh:
                return hash_stream(fh, md5=rule.md5, chunk_size=self.s.chunk_mb << 20,
                                   on_chunk=lambda n: self.hooks.bytes_hashed(rec.rule, n),
                                   also=[scan] if scan else [])
        except SourceUnreadable as exc:
            raise PermanentError(f"{exc} (fix the permissions, then `edge-agent retry {rec.id}`)") from None
        except OSError as exc:
            raise RetryableError(f"reading {rec.relpath} failed: {exc.strerror}") from None

    def _send_first(self, rec: FileRecord, t: Target, size: int, scan: FitsScan | None) -> Digests:
        rule = self.s.rules[rec.rule]
        pace = self._pacer(rec.rule, t.location)

        def pace_and_count(n: int) -> None:
            pace(n)
            self.hooks.bytes_hashed(rec.rule, n)

        started = self.clock()
        try:
            # reserved while its URL was empty: only a leftover of this version's own upload cut short
            # (_first_target told) is replaced; anything else there now is DestinationOccupied
            d = self.transports.for_url(t.url).put(self._local(rec), t.url,
                                Expected(size, None, want_md5=rule.md5, may_replace=t.replace_leftover),
                                pace_and_count, also=[scan] if scan else [])
        except SourceUnreadable as exc:
            raise PermanentError(f"{exc} (fix the permissions, then `edge-agent retry {rec.id}`)") from None
        hit("after_first_put")
        took = max(self.clock() - started, 1e-6)
        log.debug("first copy written while hashing", file_id=rec.id, location=t.location,
                  mb_per_s=round(d.size / took / 1e6, 1))
        return d

    def _discard_first(self, rec: FileRecord, scope: str, name: str, t: Target) -> None:
        """A first copy of bytes that will not be hashed into a version (changed, corrupt): removed
        and the reservation given up; if the removal fails the name stays reserved (nobody else
        writes under it; a later attempt of this version replaces it)."""
        try:
            self.transports.for_url(t.url).delete(t.url)
        except Exception as exc:  # noqa: BLE001 - the name stays this version's: nobody counts it
            log.warning("could not remove a first copy that will not be registered", file_id=rec.id,
                        location=t.location, error=str(exc))
            return
        self.ledger.drop_reservation(scope, name, rec.id)

    def _fits_metadata(self, rec: FileRecord, scan: FitsScan | None) -> dict[str, Any]:
        """Header keywords as metadata; a FITS file whose own checksums fail is corrupt at the source."""
        if scan is None:
            return {}
        res = scan.result()
        if not res.is_fits:
            return {}
        rule = self.s.rules[rec.rule]
        corrupt = [p for p in res.problems() if "after HDU" not in p]   # trailing records are tolerated
        if corrupt and rule.fits_verify:
            raise PermanentError("FITS file fails its own verification (corrupt at the source, not sent): "
                                 + "; ".join(corrupt[:3]) + f" (`edge-agent retry {rec.id}` after fixing it, "
                                 "or fits_verify = false)")
        if corrupt:
            log.warning("FITS verification failed; sent anyway (fits_verify = false)", file_id=rec.id,
                        path=rec.relpath, problems=corrupt[:3])
        return {k.lower(): v for k, v in res.metadata(rule.fits_keywords).items()}

    def _sidecar(self, rec: FileRecord) -> dict[str, Any]:
        rule = self.s.rules[rec.rule]
        if Completion.SIDECAR not in rule.completion:
            return {}
        try:
            with open(rec.fspath + rule.sidecar_suffix, "rb") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileChanged("the sidecar file vanished") from None
        except (OSError, ValueError) as exc:
            raise RetryableError(f"sidecar unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise PermanentError("the sidecar is JSON but not an object")
        return {str(k): v for k, v in data.items()}

    def register(self, rec: FileRecord) -> None:
        self.lake.register(self.lake_file(rec))
        hit("after_register")
        self._move(rec, Event.REGISTERED, attempts=0)

    def transfer(self, rec: FileRecord) -> None:
        f = self.lake_file(rec)
        recorded = {r["location"]: r for r in self.ledger.replicas(rec.id)}
        targets = self.lake.targets(f)
        sent = [t for t in targets if (r := recorded.get(t.location)) is not None
                and r["state"] == "sent" and r["url"] == t.url]
        todo = [t for t in targets if t not in sent and not ((r := recorded.get(t.location)) is not None
                                                             and r["state"] == "written" and r["url"] == t.url)]
        if todo:
            writer = self.ledger.claim_writer(f.scope, f.name, rec.id)
            if writer != rec.id:
                # another version with these very bytes writes the copies under this name: they count
                # for this one too once written; meanwhile nothing is written (nor removed) here
                for t in todo:
                    there = self.transports.for_url(t.url).stat(t.url)
                    if there is None or there.size != f.size or there.adler32 != f.adler32:
                        raise RetryableError(f"the copies of {f.did} are being written by file {writer} "
                                             "(the same bytes); they count for this file once written")
        # A URL is this version's to overwrite only where it wrote before (a bad or lost copy, a
        # crash mid-write) or found it empty and recorded so before writing: anything else there is
        # never replaced (an identical copy counts; other bytes are DestinationOccupied).
        own = {t.location for t in todo if (r := recorded.get(t.location)) is not None and r["url"] == t.url}
        for t in todo:
            if t.location not in own and not self.transports.for_url(t.url).exists(t.url):
                # asked right before its own upload (an earlier one may have taken minutes)
                self.ledger.record_replicas(rec.id, [(t.location, t.url)], "writing")
                own.add(t.location)
            # what a version with these bytes wrote there (the name's writer) is recognised by size and
            # adler32; anything else only by a strong digest, or it is DestinationOccupied
            expected = Expected(f.size, f.blake3, f.adler32, f.md5, may_replace=t.location in own,
                                known_writer=self.ledger.copy_written(f.scope, f.name, t.location))
            started = self.clock()
            got = self.transports.for_url(t.url).put(self._local(rec), t.url, expected, self._pacer(rec.rule, t.location))
            hit("after_put")
            self.lake.add_replica(f, t.location, t.url)
            hit("after_add_replica")
            took = max(self.clock() - started, 1e-6)
            self.ledger.record_replica(rec.id, t.location, t.url, got.size, got.adler32, "written", note=(
                rec.state, "copy_written", {"location": t.location, "url": t.url, "seconds": round(took, 3),
                                            "mb_per_s": round(got.size / took / 1e6, 1)}))
        for t in sent:
            # written in the hashing pass, before the DID existed; recorded in the lake once the other
            # copies are written too (a file that vanishes meanwhile leaves no half-copied DID behind)
            r = recorded[t.location]
            self.lake.add_replica(f, t.location, t.url)
            hit("after_add_replica")
            self.ledger.record_replica(rec.id, t.location, t.url, r["size"], r["adler32"], "written")
        ref = self.lake.request_copies(f)
        hit("after_rule")
        self._move(rec, Event.TRANSFERRED, {"lake_ref": ref} if ref else None, attempts=0, next_at=0,
                   lake_ref=ref)

    def _pacer(self, rule: str, location: str) -> Pacer:
        def pace(n: int) -> None:
            self.pace(n)
            self.hooks.bytes_sent(rule, location, n)
        return pace

    def confirm(self, rec: FileRecord) -> None:
        f = self.lake_file(rec)
        state = self.lake.copies_state(f, rec.lake_ref)
        if state is CopiesState.MISSING:
            # the rule expired or was deleted before the copies were confirmed: ask again
            ref = self.lake.request_copies(f)
            self.ledger.set_lake_ref(rec.id, ref)
            self.ledger.note(rec.id, rec.state, "rule_recreated", {"old": rec.lake_ref, "new": ref})
            log.warning("replication rule gone; asked again", file_id=rec.id, did=rec.did, old=rec.lake_ref,
                        new=ref)
            rec = self.ledger.get(rec.id)
            state = self.lake.copies_state(f, ref)
        c = policy.judge_replicas(self.replicas(f), f.size, f.adler32)
        evidence = {"replicas": [{"location": r.location, "size": r.size, "adler32": r.adler32,
                                  "adler32_from_catalogue": r.adler32_from_catalogue} for r in c.good],
                    "not_counted": [{"location": r.location, "why": why} for r, why in c.bad]}
        if rec.lake_ref:
            evidence["rule"] = {"id": rec.lake_ref, "state": state}
        if state not in (None, CopiesState.OK):
            self._not_yet(rec, f, c, state, evidence)
            return
        if c.count >= f.copies:
            rec = self._move(rec, Event.CONFIRMED, evidence, attempts=0, reason=None)
            self._maybe_delete(rec, c)
            return
        if self._reseed(rec, f, c):
            return
        self._not_yet(rec, f, c, state, evidence)

    def _reseed(self, rec: FileRecord, f: LakeFile, c: policy.Confirmation) -> bool:
        """Copies the agent wrote that now hold other bytes or are gone, while the buffer still holds
        the file: said loudly (replica_lost) and written again from the buffer, a bounded number of
        rounds. A bad copy the lake made is the lake's to mend: reported, never counted. True if
        the file was sent back to be rewritten."""
        own = {t.location: t.url for t in self.lake.targets(f)}
        if not own:
            return False
        good = {r.location for r in c.good}
        rewrite: dict[str, tuple[str, str, str]] = {}     # location -> (url, replica state, why)
        for r, why in c.bad:
            if r.location in own and r.location not in good and r.available and r.size is not None:
                # the URL the agent writes to (a catalogue's PFN for it may be spelled otherwise)
                rewrite[r.location] = (own[r.location], "bad", why)
        # gone: listed, but the storage says it holds nothing; or (the local lake) not there at all.
        # A storage that did not answer proves nothing either way: waited for, never rewritten.
        listed = {r.location: r for r in (*c.good, *(r for r, _ in c.bad))}
        for row in self.ledger.replicas(rec.id):
            loc = row["location"]
            r = listed.get(loc)
            if row["state"] == "written" and loc in own and loc not in good and loc not in rewrite \
                    and (r is None or r.gone):
                rewrite[loc] = (own[loc], "lost", "the copy is gone from the destination")
        if not rewrite:
            return False
        why = "; ".join(f"{loc}: {w}" for loc, (_, _, w) in sorted(rewrite.items()))
        # attempts restart at each successful transfer, so earlier rounds are counted from the history
        rounds = sum(1 for h in self.ledger.history(rec.id) if h["event"] == "replica_lost"
                     and (h["detail"] or {}).get("rewrite"))
        for loc, (url, kind, _) in rewrite.items():
            self.ledger.record_replica(rec.id, loc, url, None, None, kind)
        self.ledger.note(rec.id, rec.state, "replica_lost", {"reason": why, "rewrite": sorted(rewrite)})
        log.warning("a copy the agent wrote is bad or gone; writing it again from the buffer", file_id=rec.id,
                    did=rec.did, reason=why)
        if rounds + 1 >= MAX_BAD_COPIES:
            raise PermanentError(f"copies keep failing verification: {why}")
        kinds = {kind for _, kind, _ in rewrite.values()}
        lead = "copy failed verification, rewriting" if "bad" in kinds else "copy lost, rewriting from the buffer"
        self._fail(rec, Event.FAILED_RETRYABLE, f"{lead}: {why}", resume_state=State.REGISTERED)
        return True

    def _not_yet(self, rec: FileRecord, f: LakeFile, c: policy.Confirmation, state: CopiesState | None,
                 evidence: dict[str, Any]) -> None:
        """Not confirmed yet: look again later, and say so loudly once it is overdue or stuck."""
        now = self.clock()
        self.ledger.set_next_at(rec.id, now + self.s.confirm_interval_seconds)
        deadline = (self.s.lake.rucio.stuck_after_hours if self.s.lake.rucio else self.s.lake.stuck_after_hours) * 3600
        overdue = now - rec.updated_at > deadline
        mismatched = [f"{r.location}: {w}" for r, w in c.bad if r.available and r.size is not None]
        if mismatched:
            why = "a replica does not match the local file: " + "; ".join(mismatched)
            if rec.reason != why:
                self.ledger.flag(rec.id, why)
                self.ledger.note(rec.id, rec.state, "replica_lost", {"reason": why, **evidence})
                log.warning("replica does not verify; local file kept", file_id=rec.id, did=rec.did, reason=why)
        elif state in (CopiesState.STUCK, CopiesState.SUSPENDED) or overdue:
            why = (f"rule {rec.lake_ref} is {state}" if state in (CopiesState.STUCK, CopiesState.SUSPENDED) else
                   f"rule {rec.lake_ref} still {state or 'not OK'} after {(now - rec.updated_at) / 3600:.1f} h")
            why += f"; {c.count} of {f.copies} replicas confirmed"
            if rec.reason != why:
                self.ledger.flag(rec.id, why)
                self.ledger.note(rec.id, rec.state, "stuck", {"reason": why, **evidence})
                log.warning("replication stuck", file_id=rec.id, did=rec.did, reason=why)
        else:
            log.info("waiting for replicas", file_id=rec.id, did=rec.did, confirmed=c.count, copies=f.copies,
                     rule_state=state, not_counted=evidence["not_counted"])

    def delete(self, rec: FileRecord) -> None:
        """A confirmed file whose deletion was deferred: the lake is asked again right before."""
        f = self.lake_file(rec)
        c = policy.judge_replicas(self.replicas(f), f.size, f.adler32)
        state = self.lake.copies_state(f, rec.lake_ref)
        if state not in (None, CopiesState.OK):
            c = policy.Confirmation((), tuple((r, f"rule is {state}") for r in c.good))
        if c.count < f.copies and state in (None, CopiesState.OK) and self._reseed(rec, f, c):
            return
        if c.count < f.copies:
            why = (f"held: {c.count} of {f.copies} replicas confirmed now, after confirmation earlier; "
                   + "; ".join(f"{r.location}: {w}" for r, w in c.bad))
            if rec.reason != why:
                self.ledger.flag(rec.id, why)
                self.ledger.note(rec.id, rec.state, "replica_lost", {"reason": why})
                log.warning("replica no longer verifies; local file kept", file_id=rec.id, did=rec.did,
                            reason=why)
        elif rec.reason:
            self.ledger.flag(rec.id, None)
        self._maybe_delete(rec, c)

    def _maybe_delete(self, rec: FileRecord, c: policy.Confirmation) -> None:
        rule = self.s.rules[rec.rule]
        local = self._local(rec)
        # a crash inside guarded_unlink leaves the file under this version's "deleting" name: still
        # ours to finish, whatever was published under the path since (its ctime is our rename's)
        current = leftover(local, self._recorded_stat(rec)) or local.stat()
        kept = 0.0
        if rule.delete is DeletePolicy.KEEP:
            # the keep period runs on the monotonic clock once this process has seen the file: a
            # wall-clock step forward must not delete it early (nor a step back hold it longer)
            mono = self.monotonic()
            key = (rec.id, rec.confirmed_at)     # a copy written again is confirmed anew: kept anew
            since = self._confirmed_mono.setdefault(key, policy.confirmed_since(rec.confirmed_at, self.clock(), mono))
            kept = mono - since
        verdict, why = policy.deletion_verdict(
            rule.delete.value, rule.keep_hours, kept, c,
            rule.copies, self._recorded_stat(rec), current, self.s.dry_run)
        if verdict != "wait":
            self._confirmed_mono.pop((rec.id, rec.confirmed_at), None)
        evidence = {"replicas": [{"location": r.location, "size": r.size, "adler32": r.adler32, "url": r.url,
                                  "adler32_from_catalogue": r.adler32_from_catalogue} for r in c.good],
                    "local_adler32": rec.adler32, "local_size": rec.size}
        if verdict == "delete" and rec.dev is not None and rec.inode is not None \
                and self.open_writers(rec.dev, rec.inode):
            # a writer that paused longer than the whole upload would write into a deleted file
            verdict, why = "wait", "a process still holds the file open for writing"
            log.warning("not deleting: file still open for writing", file_id=rec.id, path=rec.relpath)
        if verdict == "delete":
            # The DAQ's name goes first (guarded): a file published under it at that instant is kept
            # and nothing is released. The buffer replica (register in place) is registered under the
            # agent's own name for this version, released after, then that name removed: a crash in
            # between finds the file gone and finishes ("gone"); the reaper never reaches the DAQ's name.
            try:
                outcome = guarded_unlink(local, self._recorded_stat(rec), self._recheck(rec))
            except PermissionError as exc:
                raise PermanentError(f"cannot delete {rec.relpath}: {exc.strerror} (the agent needs write "
                                     "permission on its directory; the copies are confirmed: fix it, then "
                                     f"`edge-agent retry {rec.id}`)") from None
            hit("after_unlink")
            if outcome == "changed":
                # this version is confirmed in the lake: its own buffer copy may go, the new file stays
                self._release(rec, path_unlinked=False)
                raise FileChanged("the local file changed just before deletion; kept")
            self._release(rec)
            self._move(rec, Event.DELETED, {**evidence, "outcome": outcome, "why": why})
            self._cleanup_companions(rec)
        elif verdict == "gone":
            self._release(rec)
            self._move(rec, Event.DELETED, {**evidence, "outcome": "gone", "why": why})
            self._cleanup_companions(rec)
        elif verdict == "changed":
            self._changed(rec, why)
        elif verdict == "keep":
            # never delete: the file stays confirmed; look again rarely (policy may change on restart)
            self.ledger.set_next_at(rec.id, self.clock() + (3600 if rule.delete is DeletePolicy.NEVER
                                                             else self.s.confirm_interval_seconds))
            log.info("kept", file_id=rec.id, did=rec.did, why=why)
        else:  # wait
            wait = self.s.confirm_interval_seconds
            if rule.delete is DeletePolicy.KEEP:
                wait = max(wait, rule.keep_hours * 3600 - kept)
            self.ledger.set_next_at(rec.id, self.clock() + wait)

    def _recheck(self, rec: FileRecord) -> Callable[[BinaryIO], bool] | None:
        """With recheck_before_delete: the file about to be deleted is read once more, and kept
        unless it still hashes to what was recorded (a rewrite that kept size and times)."""
        if not self.s.rules[rec.rule].recheck_before_delete:
            return None

        def same_content(fh: BinaryIO) -> bool:
            d = hash_stream(fh, chunk_size=self.s.chunk_mb << 20)
            return (d.size, d.blake3) == (rec.size, rec.blake3)
        return same_content

    def _cleanup_companions(self, rec: FileRecord) -> None:
        rule = self.s.rules[rec.rule]
        if not rule.delete_markers:
            return
        for p, suffix in ((Completion.MARKER, rule.marker_suffix), (Completion.SIDECAR, rule.sidecar_suffix)):
            if p in rule.completion:
                try:
                    self._local(rec).with_suffix(suffix).unlink()
                except FileVanished as exc:      # a directory on the way is now a symlink: not followed
                    log.warning("could not remove companion file", path=rec.relpath + suffix, error=str(exc))
                except OSError as exc:
                    log.warning("could not remove companion file", path=rec.relpath + suffix,
                                error=exc.strerror)


def vanished_reason(rec: FileRecord) -> str:
    return f"{rec.relpath} vanished before it was hashed (renamed or removed by someone else)"


