"""The imperative shell: watches, schedules, dispatches steps to bounded pools, shuts down cleanly.

The ledger is the queue. Work is pulled from it only as fast as workers free up
(priority first), so memory does not grow with the backlog, and a restart simply
continues from what the ledger says: recovery is the normal start path.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from .core import policy
from .core.lifecycle import BACKLOG, Event, State
from .errors import LedgerUnwritable, PermanentError, ShuttingDown, SymlinkInPath
from .lake.base import Catalogue
from .ledger import FileRecord, Ledger, StaleTransition
from .localfs import LocalFile
from .pipeline import Hooks, Pipeline
from .settings import Completion, Settings
from .status.gauges import DiskWatch, Rate, Series
from .transfer.pacing import Throttle
from .transfer.registry import Transports
from .watch.events import DirtyPaths, Watcher
from .watch.filters import RuleFilter
from .watch.scanner import Entry, classify, relpath_of, walk
from .watch.writers import WriterTable

log = structlog.get_logger("edge_agent.runner")

POOL_OF = {State.COMPLETE: "hash", State.HASHED: "lake", State.REGISTERED: "transfer",
           State.TRANSFERRED: "lake", State.CONFIRMED: "lake"}
CLOSED_FALLBACK_S = 300.0      # `closed` without a visible close event: this much quiet is enough
# The wall clock running this much behind the monotonic one since the last tick is a step back
# (NTP slews far slower): every persisted wait (backoff, confirmation, keep) is looked at again.
CLOCK_STEP_S = 1.0
# A rescan goes through the tree this many entries at a time: one ledger lookup and one commit per
# batch, and between batches the work already found is dispatched, so a tree of a million files
# neither waits for the whole walk nor holds a million rows in memory.
RESCAN_BATCH = 2000
# rows that may still be unhashed: a rescan checks that their file is still there
_PRE_HASH = (State.DISCOVERED, State.COMPLETE, State.RETRY_WAIT, State.QUARANTINED)


@dataclass
class Counters:
    hashed: dict[str, Rate] = field(default_factory=dict)
    sent: dict[str, Rate] = field(default_factory=dict)
    sent_by_location: dict[tuple[str, str], int] = field(default_factory=dict)
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)
    # the last hour, per minute and rule, so a freshly opened status page already shows a curve
    sent_history: dict[str, Series] = field(default_factory=dict)
    backlog_files_history: dict[str, Series] = field(default_factory=dict)
    backlog_bytes_history: dict[str, Series] = field(default_factory=dict)


class Runner:
    def __init__(self, settings: Settings, ledger: Ledger, lake: Catalogue, transports: Transports | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.ledger = ledger
        self.lake = lake
        if transports is None:
            from .app import build_transports  # the wiring's own, when the caller brings none
            transports = build_transports(settings)
        self.transports = transports
        self.clock = clock              # wall time: what is persisted and shown
        self.monotonic = monotonic      # durations in this process: immune to clock steps
        self._clock_offset = clock() - monotonic()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.started_at = clock()
        self.last_tick = 0.0
        self.counters = Counters({r: Rate() for r in settings.rules}, {r: Rate() for r in settings.rules},
                                 sent_history={r: Series(clock=clock) for r in settings.rules},
                                 backlog_files_history={r: Series(clock=clock) for r in settings.rules},
                                 backlog_bytes_history={r: Series(clock=clock) for r in settings.rules})
        self._lock = threading.Lock()
        self.throttle = Throttle(settings.bandwidth_mbps, settings.windows_policy())
        self.writers = WriterTable()
        self.pipeline = Pipeline(settings, ledger, lake, transports, self._pace, Hooks(
            bytes_hashed=self._on_hashed, bytes_sent=self._on_sent, transition=self._on_transition),
            clock=clock, monotonic=monotonic, open_writers=self.writers.writers)
        self.filters = {name: RuleFilter(rule) for name, rule in settings.rules.items()}
        self.dirty = DirtyPaths()
        self._overflows_told = 0
        self.watcher = Watcher(self.dirty, self.request_rescan, self._events_lost)
        self.pools = {"hash": cf.ThreadPoolExecutor(settings.hash_workers, "hash"),
                      "transfer": cf.ThreadPoolExecutor(settings.transfer_workers, "transfer"),
                      "lake": cf.ThreadPoolExecutor(settings.lake_workers, "lake")}
        self.capacity = {"hash": settings.hash_workers, "transfer": settings.transfer_workers,
                         "lake": settings.lake_workers}
        self.in_flight: dict[int, str] = {}
        self._rescan_rules: set[str] = set(settings.rules)   # the first tick scans everything
        self._next_check: dict[int, float] = {}                          # monotonic
        self._unchanged: dict[int, tuple[tuple[int, int, int], float]] = {}  # stat, monotonic since
        self._completion_cursor = 0     # id after which check_completion goes on
        self.disks = {name: DiskWatch(str(r.directory), r.watermark_warn_percent / 100,
                                      r.watermark_critical_percent / 100, r.forecast_warn_hours * 3600)
                      for name, r in settings.rules.items()}
        self._disk_levels: dict[str, str] = {}
        self.lake_problem: str | None = None
        self.ledger_problem: str | None = None   # set while the ledger cannot be written: no new work
        self._ledger_probe_at = 0.0
        self.watch_problems: dict[str, str] = {}
        # rule -> None if this agent may look into its directory, else why not (another agent holds
        # the buffer); the app sets it to the buffer lock's claim
        self.may_scan: Callable[[str], str | None] = lambda rule: None
        # directory -> who holds it if another agent does (a buffer inside ours): the app sets it to
        # the buffer lock's test; rule -> the subdirectories found held, whose files are not ours
        self.held_by_another: Callable[[bytes], str | None] = lambda directory: None
        self.held_subtrees: dict[str, set[bytes]] = {}
        self.scheduler = BackgroundScheduler(daemon=True)

    # ------------------------------------------------------------ hooks
    def _pace(self, n: int) -> None:
        if self.stopping.is_set():
            raise ShuttingDown("shutting down")
        self.throttle(n)

    def _on_hashed(self, rule: str, n: int) -> None:
        if self.stopping.is_set():
            raise ShuttingDown("shutting down")
        self.counters.hashed[rule].add(n)

    def _on_sent(self, rule: str, location: str, n: int) -> None:
        self.counters.sent[rule].add(n)
        self.counters.sent_history[rule].add(n)
        with self._lock:
            key = (rule, location)
            self.counters.sent_by_location[key] = self.counters.sent_by_location.get(key, 0) + n

    def _on_transition(self, rec: FileRecord) -> None:
        with self._lock:
            key = (rec.rule, rec.state.value)
            self.counters.transitions[key] = self.counters.transitions.get(key, 0) + 1
        self.wake.set()

    def _events_lost(self, overflows: int) -> None:
        if overflows != self._overflows_told:
            self._overflows_told = overflows
            log.warning("inotify queue overflowed: events were lost; rescanning every rule now "
                        "(raise fs.inotify.max_queued_events if this recurs)", overflows=overflows)
        self.request_rescan()

    def request_rescan(self, rule: str | None = None) -> None:
        with self._lock:
            self._rescan_rules.update([rule] if rule else self.s.rules)
        self.wake.set()

    # ------------------------------------------------------------ life
    def start(self) -> None:
        woken = self.ledger.wake([State.TRANSFERRED, State.CONFIRMED])
        if woken:
            log.info("resuming", files_waiting_on_the_lake=woken)
        self.finish_cleanups()
        # a backoff further ahead than any backoff can be was scheduled before the clock stepped
        # back while the agent was down: due now rather than hours late
        r = self.s.retry
        early = self.ledger.wake([State.RETRY_WAIT], beyond=self.clock() + policy.longest_backoff(
            r.max_seconds, r.jitter))
        if early:
            log.warning("retry times beyond the longest backoff (the clock stepped back?): due now", files=early)
        for name, rule in self.s.rules.items():
            if not rule.directory.is_dir():
                self.watch_problems[name] = f"{rule.directory} does not exist (yet): rescans will look again"
                log.warning("watched directory missing", rule=name, directory=str(rule.directory))
                continue
            problem = self.watcher.watch(name, str(rule.directory), rule.recursive)
            if problem:
                self.watch_problems[name] = problem + " (rescans still cover it)"
                log.warning("events unavailable", rule=name, problem=problem)
        self.watcher.start()
        self.scheduler.add_job(self.request_rescan, "interval", seconds=self.s.rescan_seconds, id="rescan",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self.sample_disks, "interval", seconds=30, id="disks", max_instances=1,
                               coalesce=True)
        self.scheduler.add_job(self.check_lake, "interval", seconds=15, id="lake", max_instances=1,
                               coalesce=True)
        self.scheduler.add_job(self.sample_backlog, "interval", seconds=30, id="backlog", max_instances=1,
                               coalesce=True)
        self.scheduler.add_job(self.check_ledger, "interval", seconds=5, id="ledger", max_instances=1,
                               coalesce=True)
        self.scheduler.start()
        self.sample_disks()
        self.sample_backlog()
        self.check_lake()
        log.info("started", rules=list(self.s.rules), dry_run=self.s.dry_run)

    def run_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.is_set():
                try:
                    self.tick()
                except LedgerUnwritable as exc:
                    self._ledger_down(str(exc))
                except Exception:  # noqa: BLE001 - a bad tick (a locked ledger, a bug) must not end the daemon
                    log.error("main loop error; going on", exc_info=True)
                    self.stopping.wait(min(5.0, self.s.rescan_seconds))
                self.wake.wait(self.s.tick_seconds)
                self.wake.clear()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def shutdown(self, grace_s: float = 30.0) -> None:
        self.stopping.set()
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - not started
            pass
        self.watcher.stop()
        deadline = time.monotonic() + grace_s
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("stopped", abandoned_steps=len(self.in_flight))

    # ------------------------------------------------------------ the loop
    def tick(self) -> None:
        now = self.clock()
        if self.ledger_problem and not self._ledger_back(now):
            self.last_tick = now   # alive, but not ready: /readyz says why
            return
        self._watch_clock(now)
        self.process_events()
        with self._lock:
            rules, self._rescan_rules = self._rescan_rules, set()
        for rule in rules:
            self.rescan(rule)
        self.check_completion(now)
        self.resume_due(now)
        self.dispatch(now)
        self.last_tick = now   # only a whole tick counts as alive for /healthz

    def _watch_clock(self, now: float) -> None:
        """Persisted waits are wall times (they outlive a restart). After a step back they would
        come due late by the size of the step, so they are all made due now: each step decides
        again (a retry, a confirmation, a deletion whose keep period runs on the monotonic clock)."""
        offset = now - self.monotonic()
        back = self._clock_offset - offset
        if back > CLOCK_STEP_S:
            # a ledger that cannot be written raises here: the step is still seen once it can
            woken = self.ledger.wake([State.RETRY_WAIT, State.TRANSFERRED, State.CONFIRMED])
            log.warning("wall clock stepped back; waiting files are looked at now", seconds=round(back, 1),
                        files=woken)
            if self.scheduler.running:
                # the scheduler's next runs are wall times too: rescans and lake checks would pause
                # for the size of the step
                for job in self.scheduler.get_jobs():
                    job.modify(next_run_time=dt.datetime.now(self.scheduler.timezone) + job.trigger.interval)
        self._clock_offset = offset

    def process_events(self) -> None:
        paths, overflowed = self.dirty.take()
        if overflowed:
            log.warning("event backlog overflowed; rescanning")
            self.request_rescan()
        for path, rule in paths.items():
            root = os.fsencode(self.s.rules[rule].directory)
            self.evaluate(rule, path, classify(root, path), self.ledger.live(rule, path))

    def rescan(self, rule: str) -> None:
        started = time.monotonic()
        r = self.s.rules[rule]
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
            self._between_batches()
        # rows whose file the walk did not find: vanished before they were hashed? Looked at
        # page by page, each with a fresh lstat, rather than against a set of every path seen
        after = 0
        while page := self.ledger.unhashed_paths(_PRE_HASH, rule, after, RESCAN_BATCH):
            after = page[-1][0]
            for fid, path in page:
                if fid not in self.in_flight and not _regular(path):
                    self.evaluate(rule, path, classify(root, path), self.ledger.get(fid))
            if self.stopping.is_set():
                return
        for directory in self.held_subtrees.get(rule, set()) - held:
            self.ledger.clear_notice(directory)
            log.info("a subdirectory another agent held is free again: taken in", rule=rule,
                     path=relpath_of(root, directory))
        self.held_subtrees[rule] = held
        log.info("rescanned", rule=rule, entries=n, seconds=round(time.monotonic() - started, 2))

    def _between_batches(self) -> None:
        """Work found early in a long rescan goes ahead while the rescan goes on; the loop is
        alive meanwhile, which /healthz may say."""
        now = self.clock()
        self.check_completion(now, budget=RESCAN_BATCH)
        self.dispatch(now)
        self.last_tick = now

    def evaluate(self, rule: str, path: bytes, entry: Entry | None, rec: FileRecord | None) -> None:
        """Bring the ledger up to date with what is at `path` now (`rec`: its live row, if any)."""
        if self._in_held_subtree(rule, path):
            return   # another agent's buffer (events, rows of an earlier run): not ours to look at
        if entry is None or entry.problem:
            if entry is not None and entry.problem:
                kind = "held-elsewhere" if entry.held else "unusable"
                if self.ledger.notice(rule, path, kind, entry.problem):
                    log.warning("not handled", rule=rule, path=entry.relpath, why=entry.problem)
            if rec is not None and rec.blake3 is None and rec.id not in self.in_flight \
                    and rec.state in (State.DISCOVERED, State.COMPLETE, State.RETRY_WAIT, State.QUARANTINED):
                self._supersede(rec, f"{rec.relpath} vanished before it was hashed "
                                     "(renamed or removed by someone else)")
            return
        skip = self.filters[rule](entry.relpath)
        if skip is not None:
            assert entry.st is not None
            if skip.writing:
                if self.clock() - entry.st.st_mtime > self.s.stale_temp_seconds:
                    if self.ledger.notice(rule, path, "stale-temporary",
                                          f"{skip.reason}, but unchanged for over {self.s.stale_temp_seconds:.0f}s: "
                                          "did the writer die?"):
                        log.warning("stale temporary file", rule=rule, path=entry.relpath)
            return
        st = entry.st
        assert st is not None
        if rec is None:
            self.ledger.discover(rule, path, entry.relpath, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                 self.s.rules[rule].priority)
            self.ledger.clear_notice(path)
            return
        if (rec.inode, rec.size, rec.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns):
            return
        if rec.id in self.in_flight:
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
                                 self.s.rules[rule].priority)

    def finish_cleanups(self) -> None:
        """What ended versions left to clean up when the agent stopped (a crash between superseding
        a version and removing its unregistered first copy, or in the middle of that removal):
        finished now, best effort, as the running agent would have."""
        for fid in self.ledger.ended_holders():
            try:
                self.pipeline.discard_unregistered(self.ledger.get(fid))
            except Exception:  # noqa: BLE001 - dark data at worst; tried again at the next start
                log.warning("could not finish cleaning up after an ended version", file_id=fid, exc_info=True)

    def _supersede(self, rec: FileRecord, reason: str) -> None:
        try:
            self.ledger.transition(rec.id, rec.state, Event.SUPERSEDED, {"reason": reason}, reason=reason)
            log.warning("superseded", file_id=rec.id, rule=rec.rule, path=rec.relpath, reason=reason)
        except StaleTransition:
            return
        if rec.blake3 is not None or self.ledger.names_owned(rec.id):
            # a first copy written while hashing (or a name reserved for it) may wait for a
            # registration that will not come
            with contextlib.suppress(RuntimeError):   # the pools are closed when shutting down
                self.pools["lake"].submit(self.pipeline.discard_unregistered, rec)

    def check_completion(self, now: float, budget: int = 5000) -> None:
        # one page of the DISCOVERED rows per call, continuing where the last call stopped: a huge
        # backlog is looked at over several ticks, never loaded whole nor starved at its end.
        # Quiet is measured on the monotonic clock only (`now`, wall time, decides nothing here)
        mono = self.monotonic()
        page = self.ledger.in_states([State.DISCOVERED], after_id=self._completion_cursor, limit=budget)
        self._completion_cursor = page[-1].id if len(page) == budget else 0
        done: list[FileRecord] = []
        for rec in page:
            if self._next_check.get(rec.id, 0) > mono or rec.id in self.in_flight:
                continue
            rule = self.s.rules.get(rec.rule)
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

    def observe(self, rec: FileRecord, rule: Any, unchanged_s: float) -> policy.Observation:
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

    def resume_due(self, now: float) -> None:
        for rec in self.ledger.due([State.RETRY_WAIT], now, 200):
            try:
                self.ledger.transition(rec.id, State.RETRY_WAIT, Event.RETRY_DUE, None, next_at=0)
            except StaleTransition:
                pass

    def dispatch(self, now: float) -> None:
        if self.stopping.is_set():
            return
        for pool, states in (("hash", [State.COMPLETE]), ("transfer", [State.REGISTERED]),
                             ("lake", [State.HASHED, State.TRANSFERRED, State.CONFIRMED])):
            with self._lock:
                busy = sum(1 for p in self.in_flight.values() if p == pool)
                exclude = list(self.in_flight)
            free = self.capacity[pool] - busy
            if free <= 0:
                continue
            for rec in self.ledger.due(states, now, free, exclude):
                if rec.rule not in self.s.rules:
                    continue  # a rule removed from the config: its files wait for it to come back
                if self._held_elsewhere(rec):
                    # another agent's: never hashed, copied or deleted by this one; looked at again
                    # later (the other agent may stop), and meanwhile out of the way of the others
                    self.ledger.set_next_at(rec.id, now + self.s.rescan_seconds)
                    continue
                with self._lock:
                    self.in_flight[rec.id] = pool
                self.pools[pool].submit(self._run, rec)

    def _in_held_subtree(self, rule: str, path: bytes) -> bool:
        return any(path.startswith(d + b"/") for d in self.held_subtrees.get(rule, ()))

    def _held_elsewhere(self, rec: FileRecord) -> bool:
        """Is `rec` below a subdirectory another agent holds? Asked of the filesystem, not only of
        the last walk: a first rescan dispatches work before it has reached every subdirectory."""
        if self._in_held_subtree(rec.rule, rec.path):
            return True
        root = os.fsencode(self.s.rules[rec.rule].directory).rstrip(b"/")
        d = os.path.dirname(rec.path)
        while d.startswith(root + b"/"):
            if self.held_by_another(d) is not None:
                self.held_subtrees.setdefault(rec.rule, set()).add(d)
                return True
            d = os.path.dirname(d)
        return False

    def _run(self, rec: FileRecord) -> None:
        try:
            self.pipeline.run_step(rec)
        except ShuttingDown:
            pass
        except LedgerUnwritable as exc:
            self._ledger_down(str(exc))   # the step's effect is repeated once the ledger can record it
        finally:
            with self._lock:
                self.in_flight.pop(rec.id, None)
            self.wake.set()

    # ------------------------------------------------------------ a ledger that cannot be written
    def _ledger_down(self, why: str) -> None:
        """Nothing may be acknowledged that the ledger could not record: stop taking work. Steps
        already running fail at their next transition; their effects are idempotent and repeated."""
        with self._lock:
            first, self.ledger_problem = self.ledger_problem is None, why
        if first and self.ledger.damage:
            log.error("ledger cannot be trusted: no new work (runbook: the ledger is damaged)", problem=why)
        elif first:
            log.error("ledger cannot be written: no new work until it can (free space in state_dir)",
                      problem=why)

    def check_ledger(self) -> None:
        """The periodic probe: a ledger deleted, replaced or found corrupt stops new work as a full
        one does, and for good (Ledger.probe is sticky)."""
        why = self.ledger.probe()
        if why:
            self._ledger_down(why)

    def _ledger_back(self, now: float) -> bool:
        if self.monotonic() < self._ledger_probe_at:
            return False
        self._ledger_probe_at = self.monotonic() + 2.0
        if why := self.ledger.probe():
            self._ledger_down(why)   # a write may still succeed into a damaged or deleted file
            return False
        try:
            self.ledger.set_meta("last_write_probe", repr(now))
        except LedgerUnwritable:
            return False
        log.info("ledger writable again; resuming", was=self.ledger_problem)
        self.ledger_problem = None
        self.request_rescan()
        return True

    # ------------------------------------------------------------ periodic checks
    def sample_disks(self) -> None:
        for name, d in self.disks.items():
            rep = d.sample()
            if rep is None:
                continue
            prev = self._disk_levels.get(name, "ok")
            if rep.level != prev:
                logf = log.warning if rep.level != "ok" else log.info
                logf("buffer disk level", rule=name, level=rep.level, used_percent=round(100 * rep.used_fraction, 1),
                     hours_to_full=rep.seconds_to_full and round(rep.seconds_to_full / 3600, 1))
                self._disk_levels[name] = rep.level

    def sample_backlog(self) -> None:
        files = {rule: 0 for rule in self.s.rules}
        nbytes = dict(files)
        for rule, state, n, b in self.ledger.counts():
            if rule in files and State(state) in BACKLOG:
                files[rule] += n
                nbytes[rule] += b
        for rule in files:
            self.counters.backlog_files_history[rule].put(files[rule])
            self.counters.backlog_bytes_history[rule].put(nbytes[rule])

    def check_lake(self) -> None:
        try:
            problem = self.lake.health()
        except Exception as exc:  # noqa: BLE001 - a health probe reports, it never raises
            problem = f"{type(exc).__name__}: {exc}"
        if problem != self.lake_problem:
            (log.warning if problem else log.info)("lake health", problem=problem)
        if self.lake_problem and not problem:
            # the lake is back: what waited out a backoff because of it need not wait any longer
            woken = self.ledger.wake([State.RETRY_WAIT])
            log.info("lake back; retrying now", files=woken)
            self.wake.set()
        self.lake_problem = problem


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
    import json
    try:
        with open(path, "rb") as fh:
            return isinstance(json.load(fh), dict)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False
