"""Finding files and judging them complete: inotify events and rescans bring the ledger up to date
with the watched trees (a new file is discovered, a changed one restarted or superseded, a vanished
one ended), and each discovered file is looked at until its rule's completion policy says the writer
is done. Quiet is measured on the monotonic clock only."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from typing import Callable, Iterator

import structlog

from ..core import policy
from ..core.lifecycle import UNHASHED, Event, State
from ..core.receipts import is_receipt
from ..errors import PermanentError, SymlinkInPath
from ..ledger import FileRecord, Ledger, StaleTransition
from ..localfs import LocalFile
from ..settings import Completion, RuleSettings, Settings
from .events import DirtyPaths, Watcher
from .filters import RuleFilter
from .scanner import Entry, classify, relpath_of, walk
from .writers import WriterTable

log = structlog.get_logger("edge_agent.watch")

CLOSED_FALLBACK_S = 300.0      # `closed` without a visible close event: this much quiet is enough
# A rescan goes through the tree this many entries at a time: one ledger lookup and one commit per
# batch, and between batches the work already found is dispatched, so a tree of a million files
# neither waits for the whole walk nor holds a million rows in memory.
RESCAN_BATCH = 2000


class Discovery:
    """Keeps the ledger's DISCOVERED rows true to the watched trees and moves complete files on.

    The shell wires it: `busy(file_id)` tells a step is in flight for that file (its step notices
    changes itself), `superseded(rec)` is told of every version this ends, `between_batches()` runs
    between the batches of a long rescan, `wake()` wakes the main loop.
    """

    def __init__(self, settings: Settings, ledger: Ledger, clock: Callable[[], float],
                 monotonic: Callable[[], float], stopping: threading.Event,
                 busy: Callable[[int], bool], superseded: Callable[[FileRecord], None],
                 between_batches: Callable[[], None], wake: Callable[[], None]) -> None:
        self.settings = settings
        self.ledger = ledger
        self.clock = clock
        self.monotonic = monotonic
        self.stopping = stopping
        self.busy = busy
        self.superseded = superseded
        self.between_batches = between_batches
        self.wake = wake
        # a shared ledger: this run of the agent (claims.py), and the ledger's clock less this host's
        # (leases are reckoned on the ledger's clock), set by the runner
        self.epoch: str | None = None
        self.lease_offset = 0.0
        self._receipts_seen: dict[bytes, tuple[int, int, int]] = {}   # *.receipt files looked into
        self.filters = {name: RuleFilter(rule) for name, rule in settings.rules.items()}
        self.dirty = DirtyPaths()
        self.writers = WriterTable()
        self._overflows_told = 0
        self.watcher = Watcher(self.dirty, self.request_rescan, self._events_lost)
        self._lock = threading.Lock()
        self._rescan_rules: set[str] = set(settings.rules)   # the first tick scans everything
        self._next_check: dict[int, float] = {}                          # monotonic
        self._unchanged: dict[int, tuple[tuple[int, int, int], float]] = {}  # stat, monotonic since
        self._completion_cursor = 0     # id after which check_completion goes on
        self.watch_problems: dict[str, str] = {}
        # rule -> None if this agent may look into its directory, else why not (another agent holds
        # the buffer); the app sets it to the buffer lock's claim
        self.may_scan: Callable[[str], str | None] = lambda rule: None
        # directory -> who holds it if another agent does (a buffer inside ours): the app sets it to
        # the buffer lock's test; rule -> the subdirectories found held, whose files are not ours
        self.held_by_another: Callable[[bytes], str | None] = lambda directory: None
        self.held_subtrees: dict[str, set[bytes]] = {}

    # ------------------------------------------------------------ watching
    def start(self) -> None:
        """Watch every rule's directory (a missing one is looked for again by each rescan)."""
        for name, rule in self.settings.rules.items():
            if not rule.directory.is_dir():
                self.watch_problems[name] = f"{rule.directory} does not exist (yet): rescans will look again"
                log.warning("watched directory missing", rule=name, directory=str(rule.directory))
                continue
            problem = self.watcher.watch(name, str(rule.directory), rule.recursive)
            if problem:
                self.watch_problems[name] = problem + " (rescans still cover it)"
                log.warning("events unavailable", rule=name, problem=problem)
        self.watcher.start()

    def stop(self) -> None:
        """Filesystem events are no longer watched."""
        self.watcher.stop()

    def _events_lost(self, overflows: int) -> None:
        if overflows != self._overflows_told:
            self._overflows_told = overflows
            log.warning("inotify queue overflowed: events were lost; rescanning every rule now "
                        "(raise fs.inotify.max_queued_events if this recurs)", overflows=overflows)
        self.request_rescan()

    def request_rescan(self, rule: str | None = None) -> None:
        """Rescan `rule` (every rule if None) at the next tick."""
        with self._lock:
            self._rescan_rules.update([rule] if rule else self.settings.rules)
        self.wake()

    def rescans_due(self) -> None:
        """Run the rescans asked for since the last call."""
        with self._lock:
            rules, self._rescan_rules = self._rescan_rules, set()
        for rule in rules:
            self.rescan(rule)

    def process_events(self) -> None:
        """Look at every path an event named since the last call."""
        paths, overflowed = self.dirty.take()
        if overflowed:
            log.warning("event backlog overflowed; rescanning")
            self.request_rescan()
        for path, rule in paths.items():
            root = os.fsencode(self.settings.rules[rule].directory)
            self.evaluate(rule, path, classify(root, path), self.ledger.live(rule, path))

    # ------------------------------------------------------------ rescans
    def rescan(self, rule: str) -> None:
        """Walk the rule's tree: new files discovered, changed ones looked at, rows whose file is
        gone before it was hashed ended."""
        started = time.monotonic()
        r = self.settings.rules[rule]
        root = os.fsencode(r.directory)
        held_elsewhere = self.may_scan(rule)
        if held_elsewhere:
            self.watch_problems[rule] = held_elsewhere
            return
        if rule in self.watcher.watching:
            self.watch_problems.pop(rule, None)   # a buffer held elsewhere for a while is ours again
        if r.directory.is_dir() and rule in self.watch_problems and rule not in self.watcher.watching:
            problem = self.watcher.watch(rule, str(r.directory), r.recursive)
            if problem is None:
                self.watch_problems.pop(rule, None)
        n = 0
        held: set[bytes] = set()

        def held_here(directory: bytes) -> str | None:
            who = self.held_by_another(directory)
            if who is not None:
                held.add(directory)
                self.held_subtrees.setdefault(rule, set()).add(directory)
                return (f"another edge-agent holds this directory as its buffer: {who}; its files are "
                        "left to that agent")
            return None
        for batch in _batches(walk(root, r.recursive, held_here), RESCAN_BATCH):
            known = self.ledger.live_stats(rule, [e.path for e in batch])
            new: list[tuple[bytes, str, int, int, int, int]] = []
            for entry in batch:
                row, st = known.get(entry.path), entry.st
                if st is not None and self.filters[rule](entry.relpath) is None:
                    if row is None:
                        new.append((entry.path, entry.relpath, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                        continue
                    if row[1:] == (st.st_ino, st.st_size, st.st_mtime_ns):
                        continue     # unchanged: what evaluate() would conclude, without reading the row
                self.evaluate(rule, entry.path, entry, self.ledger.live(rule, entry.path) if row else None)
            if new:
                self.ledger.discover_many(rule, new, r.priority)
            n += len(batch)
            if self.stopping.is_set():
                return
            self.between_batches()
        # rows whose file the walk did not find: vanished before they were hashed? Looked at
        # page by page, each with a fresh lstat, rather than against a set of every path seen
        after = 0
        while page := self.ledger.unhashed_paths(UNHASHED, rule, after, RESCAN_BATCH):
            after = page[-1][0]
            for fid, path in page:
                if not self.busy(fid) and not _regular(path):
                    self.evaluate(rule, path, classify(root, path), self.ledger.get(fid))
            if self.stopping.is_set():
                return
        for directory in self.held_subtrees.get(rule, set()) - held:
            self.ledger.clear_notice(directory)
            log.info("a subdirectory another agent held is free again: taken in", rule=rule,
                     path=relpath_of(root, directory))
        self.held_subtrees[rule] = held
        log.info("rescanned", rule=rule, entries=n, seconds=round(time.monotonic() - started, 2))

    def _foreign_receipt(self, rule: str, path: bytes, entry: Entry) -> None:
        """A file with a receipt's name (receipts = beside takes `*.receipt`): never sent, so one
        that is not an agent's receipt (a DAQ's own file of that name) is reported, not skipped
        without a word. Its head is read once per (inode, size, mtime)."""
        assert entry.st is not None
        key = (entry.st.st_ino, entry.st.st_size, entry.st.st_mtime_ns)
        if self._receipts_seen.get(path) == key:
            return
        if len(self._receipts_seen) > 100_000:
            self._receipts_seen.clear()
        self._receipts_seen[path] = key
        try:
            with open(path, "rb", opener=_no_follow) as fh:
                head = fh.read(1 << 20)
        except OSError:
            return
        if is_receipt(head):
            return
        if self.ledger.notice(rule, path, "not-a-receipt",
                              "named like a custody receipt (rules.*.receipts = \"beside\" takes *.receipt) but "
                              "not one of the agent's: never sent; rename it if it is data"):
            log.warning("a file named like a custody receipt is not one: not sent", rule=rule, path=entry.relpath)

    def _in_hand(self, rec: FileRecord) -> bool:
        """Is a step in flight for `rec`: one of this agent's, or (a shared ledger) another agent's
        claim on it, not given back (a released claim's lease is 0)? That step notices a change
        itself; discovery leaves the row alone meanwhile."""
        if self.busy(rec.id):
            return True
        if rec.claim_owner is None or (rec.claim_owner == self.settings.agent_id and rec.claim_epoch == self.epoch):
            return False
        # a claim whose lease ran out is a dead agent's (or given back: 0): the row is anybody's
        return (rec.claim_until or 0) > self.clock() + self.lease_offset

    def evaluate(self, rule: str, path: bytes, entry: Entry | None, rec: FileRecord | None) -> None:
        """Bring the ledger up to date with what is at `path` now (`rec`: its live row, if any)."""
        if self.in_held_subtree(rule, path):
            return   # another agent's buffer (events, rows of an earlier run): not ours to look at
        if entry is None or entry.problem:
            if entry is not None and entry.problem:
                kind = "held-elsewhere" if entry.held else "unusable"
                if self.ledger.notice(rule, path, kind, entry.problem):
                    log.warning("not handled", rule=rule, path=entry.relpath, why=entry.problem)
            if rec is not None and rec.blake3 is None and not self._in_hand(rec) and rec.state in UNHASHED:
                self._supersede(rec, f"{rec.relpath} vanished before it was hashed "
                                     "(renamed or removed by someone else)")
            return
        skip = self.filters[rule](entry.relpath)
        if skip is not None:
            assert entry.st is not None
            if skip.writing:
                stale_s = self.settings.stale_temp_seconds
                if self.clock() - entry.st.st_mtime > stale_s:
                    if self.ledger.notice(rule, path, "stale-temporary",
                                          f"{skip.reason}, but unchanged for over {stale_s:.0f}s: "
                                          "did the writer die?"):
                        log.warning("stale temporary file", rule=rule, path=entry.relpath)
            elif skip.receipt:
                self._foreign_receipt(rule, path, entry)
            return
        st = entry.st
        assert st is not None
        if rec is None:
            self.ledger.discover(rule, path, entry.relpath, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                 self.settings.rules[rule].priority)
            self.ledger.clear_notice(path)
            return
        if (rec.inode, rec.size, rec.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns):
            return
        if self._in_hand(rec):
            return   # the step in flight notices the change itself
        if rec.state is State.DISCOVERED:
            self.ledger.restat(rec.id, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self._next_check.pop(rec.id, None)
        elif rec.blake3 is None:
            try:
                self.ledger.transition(rec.id, rec.state, Event.CHANGED, {"reason": "file changed"},
                                       dev=st.st_dev, inode=st.st_ino, size=st.st_size,
                                       mtime_ns=st.st_mtime_ns, changed_at=self.clock(), next_at=0)
            except StaleTransition:
                pass
        else:
            self._supersede(rec, f"{rec.relpath} changed after it was hashed (size {rec.size} -> "
                                 f"{st.st_size}); the new content is a new version")
            self.ledger.discover(rule, path, entry.relpath, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                 self.settings.rules[rule].priority)

    def _supersede(self, rec: FileRecord, reason: str) -> None:
        try:
            self.ledger.transition(rec.id, rec.state, Event.SUPERSEDED, {"reason": reason}, reason=reason)
            log.warning("superseded", file_id=rec.id, rule=rec.rule, path=rec.relpath, reason=reason)
        except StaleTransition:
            return
        self.superseded(rec)

    # ------------------------------------------------------------ completion
    def check_completion(self, now: float, budget: int = 5000) -> None:
        """Move the DISCOVERED files whose writer is done to COMPLETE (one commit for all)."""
        # one page of the DISCOVERED rows per call, continuing where the last call stopped: a huge
        # backlog is looked at over several ticks, never loaded whole nor starved at its end.
        # Quiet is measured on the monotonic clock only (`now`, wall time, decides nothing here)
        mono = self.monotonic()
        page = self.ledger.in_states([State.DISCOVERED], after_id=self._completion_cursor, limit=budget)
        self._completion_cursor = page[-1].id if len(page) == budget else 0
        done: list[FileRecord] = []
        for rec in page:
            if self._next_check.get(rec.id, 0) > mono or self._in_hand(rec):
                continue
            rule = self.settings.rules.get(rec.rule)
            if rule is None:
                continue
            try:
                st = LocalFile.below(rule.directory, rec.path).stat()
            except (SymlinkInPath, PermanentError):
                st = None   # classify() says why: a symlink on the way is never followed
            if st is None:
                self.evaluate(rec.rule, rec.path, classify(os.fsencode(rule.directory), rec.path), rec)
                continue
            key = (st.inode, st.size, st.mtime_ns)
            if key != (rec.inode, rec.size, rec.mtime_ns):
                self.ledger.restat(rec.id, rec.dev or 0, st.inode, st.size, st.mtime_ns)
                self._unchanged[rec.id] = (key, mono)
                self._next_check[rec.id] = mono + min(1.0, rule.stable_seconds or 1.0)
                continue
            seen = self._unchanged.get(rec.id)
            if seen is None or seen[0] != key:
                # first seen like this by this process (also after a restart: the wait starts again)
                seen = self._unchanged[rec.id] = (key, mono)
            obs = self.observe(rec, rule, mono - seen[1])
            complete, why = policy.completion_verdict([c.value for c in rule.completion], obs,
                                                      rule.stable_seconds, CLOSED_FALLBACK_S)
            if complete:
                done.append(rec)
            else:
                self._next_check[rec.id] = mono + min(1.0, max(0.2, rule.stable_seconds / 5))
        # one commit for all the files found complete in this call
        self.ledger.transition_many([rec.id for rec in done], State.DISCOVERED, Event.COMPLETED, next_at=0)
        for rec in done:
            self._next_check.pop(rec.id, None)
            self._unchanged.pop(rec.id, None)
            self.dirty.forget_closed(rec.path)
        if self._completion_cursor == 0 and len(self._unchanged) > 1000:
            # forget rows that left DISCOVERED some other way (superseded, changed...)
            live = self.ledger.ids_in_state(self._unchanged, State.DISCOVERED)
            self._next_check = {k: v for k, v in self._next_check.items() if k in live}
            self._unchanged = {k: v for k, v in self._unchanged.items() if k in live}

    def observe(self, rec: FileRecord, rule: RuleSettings, unchanged_s: float) -> policy.Observation:
        """What the completion policies look at for `rec` now."""
        writers = None
        if Completion.CLOSED in rule.completion:
            writers = self.writers.writers(rec.dev or 0, rec.inode or 0)
        sidecar: bool | None = None
        if Completion.SIDECAR in rule.completion:
            sidecar = _sidecar_state(rec.fspath + rule.sidecar_suffix)
        marker = Completion.MARKER in rule.completion and os.path.exists(rec.fspath + rule.marker_suffix)
        closed = self.dirty.closed_after_change(rec.path, rec.inode, rec.size, rec.mtime_ns)
        return policy.Observation(unchanged_s=unchanged_s, closed_after_change=closed, writers=writers,
                                  marker=marker, sidecar=sidecar)

    # ------------------------------------------------------------ buffers held by another agent
    def in_held_subtree(self, rule: str, path: bytes) -> bool:
        """Is `path` below a subdirectory of `rule` that the last walk found held by another agent?"""
        return any(path.startswith(d + b"/") for d in self.held_subtrees.get(rule, ()))

    def held_elsewhere(self, rec: FileRecord) -> bool:
        """Is `rec` below a subdirectory another agent holds? Asked of the filesystem, not only of
        the last walk: a first rescan dispatches work before it has reached every subdirectory."""
        if self.in_held_subtree(rec.rule, rec.path):
            return True
        root = os.fsencode(self.settings.rules[rec.rule].directory).rstrip(b"/")
        d = os.path.dirname(rec.path)
        while d.startswith(root + b"/"):
            if self.held_by_another(d) is not None:
                self.held_subtrees.setdefault(rec.rule, set()).add(d)
                return True
            d = os.path.dirname(d)
        return False


def _regular(path: bytes) -> bool:
    """A bare lstat: the common answer (still there) without building an Entry."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _batches(entries: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    for e in entries:
        batch.append(e)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _sidecar_state(path: str) -> bool | None:
    try:
        with open(path, "rb") as fh:
            return isinstance(json.load(fh), dict)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False


def _no_follow(path: str | bytes, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
