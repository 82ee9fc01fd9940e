"""The imperative shell: schedules, dispatches steps to bounded pools, shuts down cleanly.

The ledger is the queue. Work is pulled from it only as fast as workers free up
(priority first), so memory does not grow with the backlog, and a restart simply
continues from what the ledger says: recovery is the normal start path. Which step runs
in which state and pool is the lifecycle's table; finding files and judging them complete
is watch/discovery.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from . import __version__, identity, steps
from .claims import ClaimBook
from .core import fleet, policy
from .core.lifecycle import BACKLOG, POOLS, STEPS, Event, State, states_of_pool
from .errors import LedgerUnwritable, ShuttingDown
from .lake.base import Catalogue
from .ledger import FileRecord, Ledger, StaleTransition
from .nights import CloseOut
from .settings import Settings
from .status.gauges import DiskWatch, Rate, Series
from .transfer.pacing import Throttle
from .transfer.registry import Transports
from .schedule import ScheduleWatch
from .uplink import ROUND_S, UplinkShare
from .watch import discovery
from .watch.discovery import Discovery

log = structlog.get_logger("edge_agent.runner")

# The wall clock running this much behind the monotonic one since the last tick is a step back
# (NTP slews far slower): every persisted wait (backoff, confirmation, keep) is looked at again.
CLOCK_STEP_S = 1.0

# The shortest time between two ticks of the main loop (it is woken whenever a step ends).
MIN_TICK_GAP_S = 0.02

# A job of a step that works file by file takes up to this many files, and more than one only
# while they add up to less than JOB_BYTES: small files go in groups (one dispatch, the next file
# started at once), large ones each on a worker of their own (side by side). A hashing job asks
# the catalogue about all its files at once (Catalogue.foresee): with 128 rather than 32 files a
# night of small files costs Rucio a quarter of those calls (measured: +5 % files/s end to end).
JOB_FILES = 128
JOB_BYTES = 64 << 20


def share_out(due: list[FileRecord], workers: int) -> list[list[FileRecord]]:
    """`due` (in priority order) shared out over up to `workers` jobs: each job takes files in turn
    while it holds fewer than JOB_FILES files and JOB_BYTES bytes, so a few files go one per job
    (side by side) and a backlog of small ones in groups."""
    if not due or workers <= 0:
        return []
    per_job = max(1, min(JOB_FILES, -(-len(due) // workers)))
    jobs: list[list[FileRecord]] = []
    job: list[FileRecord] = []
    size = 0
    for rec in due:
        n = rec.size or 0
        if job and (len(job) >= per_job or size + n > JOB_BYTES):
            jobs.append(job)
            job, size = [], 0
            if len(jobs) == workers:
                break
        job.append(rec)
        size += n
    else:
        jobs.append(job)
    return jobs


@dataclass
class Counters:
    """What the status page and metrics count in this process: bytes, transitions, recent history."""
    hashed: dict[str, Rate] = field(default_factory=dict)
    sent: dict[str, Rate] = field(default_factory=dict)
    sent_by_location: dict[tuple[str, str], int] = field(default_factory=dict)
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)
    extractor_skipped: dict[str, int] = field(default_factory=dict)    # per rule (on_failure = "skip")
    # the last hour, per minute and rule, so a freshly opened status page already shows a curve
    sent_history: dict[str, Series] = field(default_factory=dict)
    backlog_files_history: dict[str, Series] = field(default_factory=dict)
    backlog_bytes_history: dict[str, Series] = field(default_factory=dict)


class Runner:
    """The main loop: ticks, hands work to the step pools by the lifecycle's table, pauses while the
    ledger cannot be written, and samples what the status page shows."""

    def __init__(self, settings: Settings, ledger: Ledger, catalogue: Catalogue, transports: Transports | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.ledger = ledger
        self.catalogue = catalogue
        if transports is None:
            from .app import build_transports  # the wiring's own, when the caller brings none (tests)
            transports = build_transports(settings)
        self.transports = transports
        self.clock = clock              # wall time: what is persisted and shown
        self.monotonic = monotonic      # durations in this process: immune to clock steps
        self._clock_offset = clock() - monotonic()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.started_at = clock()
        self._beat_totals = fleet.Totals(self.started_at)   # the counters at the last heartbeat recorded
        self.last_tick = 0.0
        self.counters = Counters({r: Rate() for r in settings.rules}, {r: Rate() for r in settings.rules},
                                 sent_history={r: Series(clock=clock) for r in settings.rules},
                                 backlog_files_history={r: Series(clock=clock) for r in settings.rules},
                                 backlog_bytes_history={r: Series(clock=clock) for r in settings.rules})
        self._lock = threading.Lock()
        self.throttle = Throttle(settings.bandwidth_mbps, settings.windows_policy(), sleep=self._nap,
                                 host_mbps=settings.host_bandwidth_mbps)
        self.in_flight: dict[int, str] = {}      # file id -> the pool its step runs in
        self.jobs = {pool: 0 for pool in POOLS}   # steps (a file, or a batch) running per pool
        self.discovery = Discovery(settings, ledger, clock, monotonic, self.stopping,
                                   busy=lambda fid: fid in self.in_flight, superseded=self._superseded,
                                   between_batches=self._between_batches, wake=self.wake.set)
        self.context = steps.StepContext(
            settings, ledger, catalogue, transports, self._pace,
            steps.Hooks(bytes_hashed=self._on_hashed, bytes_sent=self._on_sent, transition=self._on_transition,
                        extractor_skipped=self._on_extractor_skipped),
            clock=clock, monotonic=monotonic, open_writers=self.discovery.writers.writers,
            holder=settings.agent_id, stopping=self.stopping.is_set)
        # a shared ledger: files are claimed for this agent's steps, with a lease renewed meanwhile
        self.agent_id = settings.agent_id
        self.place = f"{identity.machine_id()}:{settings.state_dir}"   # this process's, under agent_id
        self.epoch = uuid.uuid4().hex[:16]    # this run: a claim of another run under agent_id is not its
        self.context.epoch = self.epoch
        self.discovery.epoch = self.epoch
        self.claims = ClaimBook(settings.ledger.lease_seconds, monotonic)
        self.context.claim_firm = self.claims.firm
        self.agent_id_lost: str | None = None
        # ... and under a bandwidth cap, the cap is the fleet's: this agent sends its share of it
        self.uplink = UplinkShare(self.agent_id, ledger, self.throttle, busy=self._may_send,
                                  monotonic=monotonic) \
            if self.agent_id and (settings.bandwidth_mbps > 0 or settings.windows) else None
        # the observing schedule's alarms, for the rules that say when data are expected
        self.schedule = ScheduleWatch(settings, ledger, clock, self.started_at) \
            if any(r.expected for r in settings.rules.values()) else None
        workers = {"hash": settings.hash_workers, "transfer": settings.transfer_workers,
                   "lake": settings.lake_workers}
        self.capacity = {pool: workers[pool] for pool in POOLS}
        self.pools = {pool: cf.ThreadPoolExecutor(n, pool) for pool, n in self.capacity.items()}
        self.disks = {name: DiskWatch(str(r.directory), r.watermark_warn_percent / 100,
                                      r.watermark_critical_percent / 100, r.forecast_warn_hours * 3600)
                      for name, r in settings.rules.items()}
        self._disk_levels: dict[str, str] = {}
        self.lake_problem: str | None = None
        self.ledger_problem: str | None = None   # set while the ledger cannot be written: no new work
        self._ledger_probe_at = 0.0
        self.scheduler = BackgroundScheduler(daemon=True)
        # rules with close_nights: their nights are closed out by a job of their own
        self.close_out = CloseOut(settings, ledger, catalogue, transports, clock) \
            if any(r.close_nights for r in settings.rules.values()) else None

    # ------------------------------------------------------------ hooks
    def _pace(self, n: int) -> None:
        if self.stopping.is_set():
            raise ShuttingDown("shutting down")
        self.throttle(n)

    def _may_send(self) -> bool:
        # steps that send run now: transfers, and hashing (it writes a first copy as it reads)
        return self.jobs["transfer"] > 0 or self.jobs["hash"] > 0

    def _nap(self, seconds: float) -> None:
        # the throttle's wait, cut short when the agent stops: a share of 0 (no round runs after the
        # scheduler stopped) or a paused window would hold the worker, and the process's exit
        if self.stopping.wait(seconds):
            raise ShuttingDown("shutting down")

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

    def _on_extractor_skipped(self, rule: str) -> None:
        with self._lock:
            self.counters.extractor_skipped[rule] = self.counters.extractor_skipped.get(rule, 0) + 1

    def request_rescan(self, rule: str | None = None) -> None:
        """Rescan `rule` (every rule if None) at the next tick."""
        self.discovery.request_rescan(rule)

    # ------------------------------------------------------------ life
    def start(self) -> None:
        """Work left by the last run is due, discovery watches, and the periodic jobs (rescans, disk,
        backlog, lake and ledger checks) run; the loop itself is not started (run_forever or tick)."""
        woken = self.ledger.wake([State.TRANSFERRED, State.CONFIRMED])
        if woken:
            log.info("resuming", files_waiting_on_the_lake=woken)
        self.finish_cleanups()
        # a backoff further ahead than any backoff can be was scheduled before the clock stepped
        # back while the agent was down: due now rather than hours late
        r = self.settings.retry
        early = self.ledger.wake([State.RETRY_WAIT], beyond=self.clock() + policy.longest_backoff(
            r.max_seconds, r.jitter))
        if early:
            log.warning("retry times beyond the longest backoff (the clock stepped back?): due now", files=early)
        self.discovery.start()
        self.scheduler.add_job(self.request_rescan, "interval", seconds=self.settings.rescan_seconds, id="rescan",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self.sample_disks, "interval", seconds=30, id="disks", max_instances=1,
                               coalesce=True)
        self.scheduler.add_job(self.check_lake, "interval", seconds=15, id="lake", max_instances=1,
                               coalesce=True)
        self.scheduler.add_job(self.sample_backlog, "interval", seconds=30, id="backlog", max_instances=1,
                               coalesce=True)
        self.scheduler.add_job(self.check_ledger, "interval", seconds=5, id="ledger", max_instances=1,
                               coalesce=True)
        if self.agent_id:
            self.scheduler.add_job(self.renew_claims, "interval", seconds=self.settings.ledger.lease_seconds / 3,
                                   id="claims", max_instances=1, coalesce=True)
            self.scheduler.add_job(self.heartbeat, "interval", seconds=fleet.HEARTBEAT_S, id="heartbeat",
                                   max_instances=1, coalesce=True)
            self.heartbeat()
        if self.schedule is not None:
            self.scheduler.add_job(self.sample_schedule, "interval", seconds=30, id="schedule", max_instances=1,
                                   coalesce=True)
            self.sample_schedule()
        if self.close_out is not None:
            self.scheduler.add_job(self.close_nights, "interval", seconds=self.settings.nights_check_seconds,
                                   id="nights", max_instances=1, coalesce=True)
        if self.uplink is not None:
            self.scheduler.add_job(self.uplink.round, "interval", seconds=ROUND_S, id="uplink", max_instances=1,
                                   coalesce=True)
            self.uplink.round()
        self.scheduler.start()
        self.sample_disks()
        self.sample_backlog()
        self.check_lake()
        log.info("started", rules=list(self.settings.rules), dry_run=self.settings.dry_run)

    def run_forever(self) -> None:
        """Start, then tick until stop(); returns after shutdown."""
        self.start()
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    self.tick()
                except LedgerUnwritable as exc:
                    self._ledger_down(str(exc))
                except Exception:  # noqa: BLE001 - a bad tick (a locked ledger, a bug) must not end the daemon
                    log.error("main loop error; going on", exc_info=True)
                    self.stopping.wait(min(5.0, self.settings.rescan_seconds))
                self.wake.wait(self.settings.tick_seconds)
                self.wake.clear()
                # woken by every step that ends: at most one tick per MIN_TICK_GAP_S, so that the
                # loop's own reads do not grow with the files per second (each tick dispatches
                # all that is due meanwhile)
                rest = started + MIN_TICK_GAP_S - time.monotonic()
                if rest > 0:
                    self.stopping.wait(rest)
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask the loop to end: run_forever returns after its shutdown."""
        self.stopping.set()
        self.wake.set()

    def shutdown(self, grace_s: float = 30.0) -> None:
        """No new work is taken, discovery and the jobs are stopped, and steps running are given up
        to `grace_s` seconds to finish (what they leave is repeated at the next start)."""
        self.stopping.set()
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - not started
            pass
        self.discovery.stop()
        deadline = time.monotonic() + grace_s
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("stopped", abandoned_steps=len(self.in_flight))

    # ------------------------------------------------------------ the loop
    def tick(self) -> None:
        """One pass of the loop: events and rescans looked at, completion checked, waits that are due
        resumed, due work handed to the pools. Nothing but the probe while the ledger cannot be written."""
        now = self.clock()
        if self.ledger_problem and not self._ledger_back(now):
            self.last_tick = now   # alive, but not ready: /readyz says why
            return
        self._watch_clock(now)
        self.discovery.process_events()
        self.discovery.rescans_due()
        self.discovery.check_completion(now)
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

    def _between_batches(self) -> None:
        """Work found early in a long rescan goes ahead while the rescan goes on; the loop is
        alive meanwhile, which /healthz may say."""
        now = self.clock()
        self.discovery.check_completion(now, budget=discovery.RESCAN_BATCH)
        self.dispatch(now)
        self.last_tick = now

    def finish_cleanups(self) -> None:
        """What ended versions left to clean up when the agent stopped (a crash between superseding
        a version and removing its unregistered first copy, or in the middle of that removal):
        finished now, best effort, as the running agent would have."""
        for fid in self.ledger.ended_holders():
            try:
                steps.discard_unregistered(self.ledger.get(fid), self.context)
            except Exception:  # noqa: BLE001 - dark data at worst; tried again at the next start
                log.warning("could not finish cleaning up after an ended version", file_id=fid, exc_info=True)

    def _superseded(self, rec: FileRecord) -> None:
        """A version discovery ended: a first copy written while hashing (or a name reserved for it)
        may wait for a registration that will not come, and is cleaned up in the lake pool."""
        if rec.blake3 is not None or self.ledger.names_owned(rec.id):
            with contextlib.suppress(RuntimeError):   # the pools are closed when shutting down
                self.pools["lake"].submit(steps.discard_unregistered, rec, self.context)

    def resume_due(self, now: float) -> None:
        """Every file whose retry wait is over by `now` is back in the state it resumes."""
        for rec in self.ledger.due([State.RETRY_WAIT], now, 200):
            try:
                self.ledger.transition(rec.id, State.RETRY_WAIT, Event.RETRY_DUE, None, next_at=0)
            except StaleTransition:
                pass

    def dispatch(self, now: float) -> None:
        """Hand due work to each pool, as many jobs as it has free workers: up to lake_batch_files of
        one rule and dataset for a batched step; for a step that works file by file, the due files
        shared out over the free workers (a job takes several small files, so that a night of small
        files is not dispatched one file per tick, and one large file alone)."""
        if self.stopping.is_set():
            return
        for pool in POOLS:
            with self._lock:
                free = self.capacity[pool] - self.jobs[pool]
                exclude = list(self.in_flight)
            if free <= 0:
                continue
            states = states_of_pool(pool)
            batched = any(STEPS[s].batched for s in states)
            per_job = self.settings.lake_batch_files if batched else JOB_FILES
            jobs: dict[tuple[object, ...], list[FileRecord]] = {}
            if self.agent_id:
                asked = self.monotonic()
                found = self.ledger.claim(self.agent_id, states, now, free * per_job,
                                          self.settings.ledger.lease_seconds, exclude, rules=list(self.settings.rules),
                                          epoch=self.epoch)
                self.claims.held([rec.id for rec in found], asked)
            else:
                found = self.ledger.due(states, now, free * per_job, exclude)
            for rec in found:
                if rec.rule not in self.settings.rules:
                    continue  # a rule removed from the config: its files wait for it to come back
                if self.discovery.held_elsewhere(rec):
                    # another agent's: never hashed, copied or deleted by this one; looked at again
                    # later (the other agent may stop), and meanwhile out of the way of the others
                    self.ledger.set_next_at(rec.id, now + self.settings.rescan_seconds)
                    continue
                key: tuple[object, ...] = (rec.state, rec.rule, rec.dataset) if STEPS[rec.state].batched else ()
                jobs.setdefault(key, []).append(rec)
            if batched:
                batches = [group[i:i + per_job] for group in jobs.values() for i in range(0, len(group), per_job)]
            else:
                batches = share_out(jobs.get((), []), free)
            for batch in batches[:free]:
                with self._lock:
                    self.jobs[pool] += 1
                    for rec in batch:
                        self.in_flight[rec.id] = pool
                self.pools[pool].submit(self._run, pool, batch)
            if self.agent_id:
                # claimed but handed to no worker (no free one, another agent's buffer): given back
                handed = {rec.id for batch in batches[:free] for rec in batch}
                self._release([rec.id for rec in found if rec.id not in handed])

    def _run(self, pool: str, batch: list[FileRecord]) -> None:
        try:
            steps.run(batch, self.context)
        except ShuttingDown:
            pass
        except LedgerUnwritable as exc:
            self._ledger_down(str(exc))   # the step's effect is repeated once the ledger can record it
        except Exception as exc:  # noqa: BLE001 - a pool's thread would drop it without a word
            # outside every file's own handling (a batch's bulk bookkeeping): said loudly, and the
            # batch looked at again later rather than at every tick
            log.error("step failed for a whole batch; its files are looked at again later", pool=pool,
                      files=len(batch), file_ids=[r.id for r in batch[:20]], error=f"{type(exc).__name__}: {exc}",
                      exc_info=True)
            later = self.clock() + self.settings.confirm_interval_seconds
            for rec in batch:
                try:
                    self.ledger.set_next_at(rec.id, later)
                except Exception:  # noqa: BLE001 - due again at once then: said above
                    break
        finally:
            self._release([r.id for r in batch])
            with self._lock:
                self.jobs[pool] -= 1
                for rec in batch:
                    self.in_flight.pop(rec.id, None)
            self.wake.set()

    # ------------------------------------------------------------ a shared ledger
    def _release(self, file_ids: list[int]) -> None:
        """This agent's claims on `file_ids` given back (a shared ledger), best effort."""
        if not self.agent_id or not file_ids:
            return
        self.claims.lost(file_ids)
        try:
            self.ledger.release(self.agent_id, file_ids, epoch=self.epoch)
        except Exception as exc:  # noqa: BLE001 - the claims then run out by their lease
            log.warning("could not release claims; they run out by their lease", files=len(file_ids),
                        error=str(exc))

    def renew_claims(self) -> None:
        """The claims of the files this agent's steps work on, extended by a lease: a step that
        runs longer than one lease keeps its files (a dead agent's run out, and others take them)."""
        with self._lock:
            ids = list(self.in_flight)
        if not ids or not self.agent_id:
            return
        asked = self.monotonic()
        try:
            held = self.ledger.renew(self.agent_id, ids, self.settings.ledger.lease_seconds, self.clock(),
                                     epoch=self.epoch)
        except Exception as exc:  # noqa: BLE001 - tried again at the next renewal
            # the steps start no new effect once a third of the lease has gone by unrenewed
            log.warning("could not renew claims", files=len(ids), error=str(exc))
            return
        self.claims.held(held, asked)
        self.claims.lost(set(ids) - held)
        lost = len(set(ids) - held)
        if lost:
            # taken by another agent after this one stalled past its lease: those steps commit nothing
            log.warning("claims lost to another agent; their steps will commit nothing", files=lost)

    def heartbeat(self) -> None:
        """This agent is alive, in the shared ledger (the fleet's view), with what it did since its
        last heartbeat (core/fleet.throughput)."""
        totals = self.totals()
        with self._lock:
            in_flight = len(self.in_flight)
        try:
            assert self.agent_id is not None
            mine = self.ledger.heartbeat(self.agent_id, socket.gethostname(), os.getpid(), __version__, totals.at,
                                         place=self.place, stats={**fleet.throughput(self._beat_totals, totals, in_flight),
                                                                  "rules": sorted(self.settings.rules),
                                                                  "close_nights": sorted(
                                                                      n for n, r in self.settings.rules.items()
                                                                      if r.close_nights)})
        except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
            log.warning("could not record this agent's heartbeat", error=str(exc))
            return
        if not mine and self.agent_id_lost is None:
            # another process enrolled under this id (it found this one silent): two agents under
            # one id would take each other's claims for their own, so this one gives way
            self.agent_id_lost = (f"ledger.agent_id {self.agent_id!r}: another edge-agent now runs under this "
                                  "id; this one stops (give each agent an id of its own)")
            log.error("agent id taken over by another agent; stopping", agent_id=self.agent_id)
            self.stop()
            return
        # only a heartbeat recorded ends an interval: after a failed one the next covers both
        self._beat_totals = totals
        try:
            here = self.clock()
            self.discovery.lease_offset = self.ledger.lease_clock(here) - here
        except Exception as exc:  # noqa: BLE001 - the last offset stands until the next heartbeat
            log.warning("could not read the ledger's clock", error=str(exc))

    def totals(self) -> fleet.Totals:
        """What this agent has done since it started, now (the counters of the status page)."""
        c = self.counters
        with self._lock:
            moved = dict(c.transitions)
        return fleet.Totals(self.clock(),
                            sent_bytes=sum(r.total for r in c.sent.values()),
                            hashed_bytes=sum(r.total for r in c.hashed.values()),
                            files_transferred=sum(n for (_, st), n in moved.items() if st == State.TRANSFERRED.value),
                            files_deleted=sum(n for (_, st), n in moved.items() if st == State.DELETED.value))

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
    def sample_schedule(self) -> None:
        """The observing schedule's alarms, from what arrived (ScheduleWatch)."""
        assert self.schedule is not None
        try:
            self.schedule.sample()
        except Exception as exc:  # noqa: BLE001 - the next sample tries again; the last state stands
            log.warning("could not sample the observing schedule", error=str(exc))

    def sample_disks(self) -> None:
        """Each buffer disk sampled; a change of its level is logged."""
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
        """The backlog (files and bytes not yet confirmed) of each rule is added to its history."""
        files = {rule: 0 for rule in self.settings.rules}
        nbytes = dict(files)
        for rule, state, n, b in self.ledger.counts():
            if rule in files and State(state) in BACKLOG:
                files[rule] += n
                nbytes[rule] += b
        for rule in files:
            self.counters.backlog_files_history[rule].put(files[rule])
            self.counters.backlog_bytes_history[rule].put(nbytes[rule])

    def close_nights(self) -> None:
        """The nights due are closed out (edge_agent/nights.py); a failure is logged and tried again."""
        if self.close_out is None or self.ledger_problem or self.lake_problem:
            return
        try:
            self.close_out.run()
        except Exception:   # the scheduler's thread would swallow it: said, and tried next time
            log.exception("night close-out failed")

    def check_lake(self) -> None:
        """`lake_problem` says why the catalogue is unusable now (None: it is usable); when it comes back,
        files waiting out a backoff are due at once."""
        try:
            problem = self.catalogue.health()
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
