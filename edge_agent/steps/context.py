"""What every step works with: the settings, the ledger, the catalogue, the transports, the clocks,
and the few moves they all make (a committed transition, the file's lake view, its recorded stat)."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Sequence

import structlog

from ..core import policy
from ..core.lifecycle import Event
from ..lake.base import Catalogue, LakeFile, RecordedReplica, Target
from ..hashing import hash_stream
from ..ledger import FileRecord, Ledger, Move, StaleTransition, WrittenCopy
from ..localfs import LocalFile, inplace_link
from ..settings import RuleSettings, Settings
from ..transfer.base import Pacer, Transport
from ..transfer.registry import Transports
from . import verify

log = structlog.get_logger("edge_agent.steps")


@dataclass
class Hooks:
    """What the steps tell the outside world (metrics, throughput); all optional."""
    bytes_hashed: Callable[[str, int], None] = lambda rule, n: None
    bytes_sent: Callable[[str, str, int], None] = lambda rule, loc, n: None
    transition: Callable[[FileRecord], None] = lambda rec: None
    extractor_skipped: Callable[[str], None] = lambda rule: None   # a failed extractor skipped (its rule)


@dataclass
class StepContext:
    """The parts a step may touch. Built once by the runner (or a test) and shared by every worker."""
    settings: Settings
    ledger: Ledger
    catalogue: Catalogue
    transports: Transports            # the transport of each URL, by scheme and prefix
    pace: Pacer                       # blocks to honour the bandwidth cap; raises ShuttingDown
    hooks: Hooks = field(default_factory=Hooks)
    clock: Callable[[], float] = time.time             # wall time: what is persisted
    monotonic: Callable[[], float] = time.monotonic    # durations in this process
    rand: Callable[[], float] = random.random          # backoff jitter
    # (dev, inode) -> how many processes hold the file open for writing (None: unknown)
    open_writers: Callable[[int, int], int | None] = lambda dev, ino: None
    # (file id, confirmed_at) -> monotonic time of its confirmation, for the `keep` policy
    confirmed_mono: dict[tuple[int, float | None], float] = field(default_factory=dict)
    # a shared ledger: the agent whose claims the steps run under; a move of a file another agent
    # holds commits nothing (StaleTransition). None: claims are not used.
    holder: str | None = None
    epoch: str | None = None          # with `holder`: this run of the agent (claims of another run are not its)
    # with `holder`: is this agent's claim on a file id still firmly held (claims.ClaimBook.firm)?
    claim_firm: Callable[[int], bool] = lambda file_id: True
    # has the agent been asked to stop? (a step that waits on something else than bytes, an
    # extractor's program, gives up then)
    stopping: Callable[[], bool] = lambda: False

    def check_claim(self, rec: FileRecord, ask_ledger: bool = False) -> None:
        """Before an effect outside the ledger (a copy written, the local file unlinked): with claims,
        StaleTransition unless this agent's claim on `rec` is still firmly held. An agent that
        stalled or lost the ledger for two thirds of its lease starts no effect the new holder of
        the file may be making at the same time (the ledger fences only its commits)."""
        if self.holder is None:
            return
        if not self.claim_firm(rec.id):
            raise StaleTransition(f"file {rec.id}: the claim of {self.holder} is no longer firmly held")
        # `ask_ledger`: the ledger itself is asked too (one read), for the effect that matters most
        if ask_ledger and not self.ledger.holds(self.holder, self.epoch, rec.id, self.clock(),
                                                self.settings.ledger.lease_seconds / 3):
            raise StaleTransition(f"file {rec.id}: the ledger no longer gives {self.holder} its claim")

    def rule(self, rec: FileRecord) -> RuleSettings:
        """The settings of `rec`'s rule."""
        return self.settings.rules[rec.rule]

    def transport(self, target: Target) -> Transport:
        """The transport that writes and reads `target`'s URL."""
        return self.transports.for_url(target.url)

    def replicas(self, f: LakeFile, recorded: list[RecordedReplica] | None = None) -> list[policy.Replica]:
        """The copies of `f` the catalogue records (`recorded`: as already asked, in a batch), each as
        its storage holds it now."""
        if recorded is None:
            recorded = self.catalogue.recorded(f)
        return verify.replicas(recorded, f, self.transports, verify.Checks.of(self.settings))

    def move(self, rec: FileRecord, event: Event, detail: dict[str, Any] | None = None, *,
             copies: Sequence[WrittenCopy] = (), **updates: Any) -> FileRecord:
        """Commit `event` for `rec` (StaleTransition if it moved meanwhile), with `copies` recorded in
        the same commit, log it, tell the hooks. Returns the record as it is now."""
        try:
            new = self.ledger.transition(rec.id, rec.state, event, detail, copies=copies, holder=self.holder,
                                         epoch=self.epoch,
                                         **updates)
        except StaleTransition:
            # moved meanwhile (superseded: the file changed or went): the copies were written all
            # the same, and are remembered as this version's, for the clean-up of an ended version
            for c in copies:
                self.ledger.record_replica(rec.id, c.location, c.url, c.size, c.adler32, c.state, note=c.note)
            raise
        self._told(rec, new, event, detail)
        return new

    def move_many(self, moves: list[tuple[FileRecord, Event, dict[str, Any] | None, dict[str, Any]]]
                  ) -> dict[int, FileRecord]:
        """Commit many files' moves in one transaction (a batch step's outcome), then log each and
        tell the hooks. A file moved meanwhile by someone else is skipped. Returns the moved records
        by id, as they are now."""
        if not moves:
            return {}
        new = self.ledger.transition_group([Move(rec.id, rec.state, event, detail, updates)
                                            for rec, event, detail, updates in moves], holder=self.holder,
                                           epoch=self.epoch)
        by_id = {r.id: r for r in new}
        for rec, event, detail, _ in moves:
            now = by_id.get(rec.id)
            if now is None:
                log.info("step outdated", file_id=rec.id, rule=rec.rule, path=rec.relpath)
                continue
            self._told(rec, now, event, detail)
        return by_id

    def _told(self, rec: FileRecord, new: FileRecord, event: Event, detail: dict[str, Any] | None) -> None:
        fields = {"file_id": rec.id, "rule": rec.rule, "path": rec.relpath, "state": str(new.state),
                  "did": new.name and new.did}
        # a detail key may name something else than the line's own field (the evidence's "rule" is the
        # lake's replication rule): it is logged as detail_<key>, since a clash would raise after the commit
        fields.update({(f"detail_{k}" if k in fields else k): v for k, v in (detail or {}).items()})
        log.info(str(event), **fields)
        self.hooks.transition(new)

    def pacer(self, rule: str, location: str) -> Pacer:
        """The pace of bytes sent to `location`, counted for the throughput figures."""
        def pace(n: int) -> None:
            self.pace(n)
            self.hooks.bytes_sent(rule, location, n)
        return pace

    def lake_file(self, rec: FileRecord) -> LakeFile:
        """A hashed version as the lake sees it."""
        rule = self.rule(rec)
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

    def unhashed_file(self, rec: FileRecord, scope: str, name: str, size: int) -> LakeFile:
        """A version whose bytes are still to be read, under a candidate name: enough to ask where
        its copies would go."""
        rule = self.rule(rec)
        return LakeFile.unhashed(rec.rule, scope, name, size, rule.copies, tuple(rule.destinations), rec.fspath)

    def recorded_stat(self, rec: FileRecord) -> policy.LocalStat:
        """The stat recorded when the version was hashed: what identifies it on the buffer."""
        assert rec.inode is not None and rec.size is not None and rec.mtime_ns is not None
        # ctime_ns is None for a row hashed by an older agent: compared as before, without it. A
        # shared buffer (claims) is mounted on several hosts, each numbering its devices its own way:
        # a file hashed on one host has another st_dev on the next, so there the device is not compared.
        return policy.LocalStat(rec.inode, rec.size, rec.mtime_ns, rec.ctime_ns,
                                rec.dev if self.holder is None else None)

    def local(self, rec: FileRecord) -> LocalFile:
        """The file, reached from its rule's directory without following a symlink below it."""
        return LocalFile.below(self.rule(rec).directory, rec.path)

    def recheck(self, rec: FileRecord) -> Callable[[BinaryIO], bool] | None:
        """With recheck_before_delete: a reader that tells whether the file about to be deleted still
        hashes to what was recorded (a rewrite that kept size and times is kept). None otherwise."""
        if not self.rule(rec).recheck_before_delete:
            return None

        def same_content(fh: BinaryIO) -> bool:
            d = hash_stream(fh, chunk_size=self.settings.chunk_mb << 20)
            return (d.size, d.blake3) == (rec.size, rec.blake3)
        return same_content
