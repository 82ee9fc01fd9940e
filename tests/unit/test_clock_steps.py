"""Wall-clock steps (NTP, a bad RTC at boot) neither take a file still being written nor stall the
agent: quiet is measured on the monotonic clock; persisted waits (backoffs, confirmation, keep) are
wall times that a step back makes due at once and a step forward only brings forward (issue 12)."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.app import build_catalogue
from edge_agent.core.lifecycle import Event, State
from edge_agent.errors import LedgerUnwritable
from edge_agent.ledger import FileRecord, Ledger
from edge_agent.runner import Runner
from edge_agent.watch.discovery import CLOSED_FALLBACK_S
from edge_agent.settings import Settings

HOURS = 3 * 3600.0


class Mono:
    """A monotonic clock that only moves when told; the wall clock is the `clock` fixture."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mono() -> Mono:
    return Mono()


@pytest.fixture
def make_runner(tmp_path: Path, clock: Any, mono: Mono, settings_data: Callable[..., Any]) -> Any:
    made: list[Runner] = []
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()

    def make(**rule: Any) -> Runner:
        s = Settings(**settings_data(tmp_path, rule=rule))
        r = Runner(s, Ledger(s.ledger_path, clock=clock, synchronous="normal"), build_catalogue(s), clock=clock,
                   monotonic=mono)
        r.dispatch = lambda now: None    # type: ignore[method-assign]   # decisions only, no steps run
        made.append(r)
        return r
    yield make
    for r in made:
        for pool in r.pools.values():
            pool.shutdown()
        r.ledger.close()


def write(path: Path, data: bytes, wall: float) -> None:
    """Append as a writer does: the kernel stamps mtime from the wall clock as it is now."""
    with open(path, "ab") as fh:
        fh.write(data)
    os.utime(path, (wall, wall))


def discover(r: Runner, path: Path) -> FileRecord:
    st = path.stat()
    return r.ledger.discover("r", os.fsencode(path), path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)


def state(r: Runner, rec: FileRecord) -> State:
    return r.ledger.get(rec.id).state


# ---------------------------------------------------------------- completion

def test_a_step_forward_does_not_make_a_paused_writers_file_stable(make_runner: Any, tmp_path: Path,
                                                                   clock: Any, mono: Mono) -> None:
    r = make_runner(completion=["stable"], stable_seconds=5)
    f = tmp_path / "daq" / "f.fits"
    write(f, b"first half", clock())             # the writer pauses here
    rec = discover(r, f)
    r.discovery.check_completion(clock())
    clock.advance(HOURS)                         # NTP steps the wall clock forward by hours
    mono.now += 1
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.DISCOVERED     # old mtime, wall hours later: only 1 s seen quiet
    mono.now += 5
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.COMPLETE       # quiet for stable_seconds of monotonic time


def test_a_growing_file_is_never_stable_however_the_wall_clock_jumps(make_runner: Any, tmp_path: Path,
                                                                     clock: Any, mono: Mono) -> None:
    r = make_runner(completion=["stable"], stable_seconds=5)
    f = tmp_path / "daq" / "f.fits"
    write(f, b"x", clock())
    rec = discover(r, f)
    for i in range(6):
        clock.advance(HOURS if i % 2 == 0 else -2 * HOURS)
        mono.now += 4
        write(f, b"more", clock() - 4)
        mono.now += 4
        r.discovery.check_completion(clock())
        assert state(r, rec) is State.DISCOVERED


def test_a_step_back_does_not_hold_files_back(make_runner: Any, tmp_path: Path, clock: Any, mono: Mono) -> None:
    r = make_runner(completion=["stable"], stable_seconds=5)
    f = tmp_path / "daq" / "f.fits"
    write(f, b"done", clock())
    rec = discover(r, f)
    r.discovery.check_completion(clock())
    clock.advance(-HOURS)                        # mtime and discovery now lie hours "in the future"
    mono.now += 5
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.COMPLETE


def test_after_a_restart_the_wait_starts_again(make_runner: Any, tmp_path: Path, clock: Any, mono: Mono) -> None:
    first = make_runner(completion=["stable"], stable_seconds=5)
    f = tmp_path / "daq" / "f.fits"
    write(f, b"first half", clock())
    rec = discover(first, f)
    first.discovery.check_completion(clock())
    clock.advance(HOURS)                          # down for a while (or the clock stepped meanwhile)
    mono.now = 3.0                                # a reboot: the monotonic clock starts again
    again = make_runner(completion=["stable"], stable_seconds=5)
    again.discovery.check_completion(clock())
    mono.now += 4.9
    again.discovery.check_completion(clock())
    assert state(again, rec) is State.DISCOVERED
    mono.now += 1
    again.discovery.check_completion(clock())
    assert state(again, rec) is State.COMPLETE


def test_the_closed_fallback_runs_on_the_monotonic_clock(make_runner: Any, tmp_path: Path, clock: Any,
                                                         mono: Mono) -> None:
    r = make_runner(completion=["closed"])
    r.discovery.writers.writers = lambda dev, ino: None    # type: ignore[method-assign]   # writers cannot be seen
    f = tmp_path / "daq" / "f.fits"
    write(f, b"no close event seen", clock())
    rec = discover(r, f)
    r.discovery.check_completion(clock())
    clock.advance(HOURS)
    mono.now += 1
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.DISCOVERED
    mono.now += CLOSED_FALLBACK_S
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.COMPLETE


def test_a_close_counts_only_while_the_file_is_as_it_was_at_the_close(make_runner: Any, tmp_path: Path,
                                                                       clock: Any, mono: Mono) -> None:
    r = make_runner(completion=["closed"])
    r.discovery.writers.writers = lambda dev, ino: None    # type: ignore[method-assign]
    f = tmp_path / "daq" / "f.fits"
    write(f, b"part one", time.time())
    rec = discover(r, f)
    r.discovery.dirty.closed(os.fsencode(f), "r")          # close-after-write
    write(f, b" and part two", time.time() - HOURS)   # reopened after a step back: an mtime "before" the close
    r.discovery.check_completion(clock())
    mono.now += 1
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.DISCOVERED     # that close was before this write
    r.discovery.dirty.closed(os.fsencode(f), "r")
    mono.now += 1
    r.discovery.check_completion(clock())
    assert state(r, rec) is State.COMPLETE


# ---------------------------------------------------------------- persisted waits

def backing_off(r: Runner, tmp_path: Path, clock: Any, delay: float) -> FileRecord:
    f = tmp_path / "daq" / "f.fits"
    f.write_bytes(b"x")
    rec = r.ledger.transition(discover(r, f).id, State.DISCOVERED, Event.COMPLETED)
    return r.ledger.transition(rec.id, State.COMPLETE, Event.FAILED_RETRYABLE, {"reason": "lake down"},
                               next_at=clock() + delay)


def test_a_step_back_does_not_stall_a_backoff(make_runner: Any, tmp_path: Path, clock: Any, mono: Mono) -> None:
    r = make_runner()
    rec = backing_off(r, tmp_path, clock, 60)
    r.tick()
    assert state(r, rec) is State.RETRY_WAIT
    clock.advance(-HOURS)
    mono.now += 0.5
    r.tick()
    assert state(r, rec) is State.COMPLETE       # looked at again now, not in three hours


def test_a_step_forward_brings_a_backoff_forward(make_runner: Any, tmp_path: Path, clock: Any,
                                                 mono: Mono) -> None:
    r = make_runner()
    rec = backing_off(r, tmp_path, clock, 60)
    r.tick()
    assert state(r, rec) is State.RETRY_WAIT
    clock.advance(HOURS)
    mono.now += 0.5
    r.tick()
    assert state(r, rec) is State.COMPLETE


def test_a_slew_is_not_a_step(make_runner: Any, tmp_path: Path, clock: Any, mono: Mono) -> None:
    r = make_runner()
    rec = backing_off(r, tmp_path, clock, 60)
    mono.now += 30
    clock.advance(29.5)                          # the wall clock ran 0.5 s slow over 30 s
    r.tick()
    assert state(r, rec) is State.RETRY_WAIT


def test_a_step_back_while_the_ledger_cannot_be_written_is_seen_once_it_can(
        make_runner: Any, tmp_path: Path, clock: Any, mono: Mono, monkeypatch: pytest.MonkeyPatch) -> None:
    r = make_runner()
    rec = backing_off(r, tmp_path, clock, 60)

    def tick() -> None:   # as run_forever does
        try:
            r.tick()
        except LedgerUnwritable as exc:
            r._ledger_down(str(exc))

    def full(*a: Any, **k: Any) -> Any:
        raise LedgerUnwritable("disk full")

    tick()
    for name in ("set_meta", "wake", "discover_many", "transition"):
        monkeypatch.setattr(r.ledger, name, full)
    r._ledger_down("disk full")
    clock.advance(-HOURS)
    mono.now += 5
    tick()                                       # paused: nothing can be recorded
    assert state(r, rec) is State.RETRY_WAIT
    monkeypatch.undo()
    mono.now += 5
    clock.advance(5)
    tick()
    assert r.ledger_problem is None and state(r, rec) is State.COMPLETE


def test_a_backoff_beyond_the_longest_one_is_due_at_start(make_runner: Any, tmp_path: Path, clock: Any) -> None:
    """The clock stepped back while the agent was down: no process saw the step."""
    r = make_runner()
    near = backing_off(r, tmp_path, clock, r.settings.retry.max_seconds)
    g = tmp_path / "daq" / "g.fits"
    g.write_bytes(b"y")
    far = r.ledger.transition(discover(r, g).id, State.DISCOVERED, Event.COMPLETED)
    far = r.ledger.transition(far.id, State.COMPLETE, Event.FAILED_RETRYABLE, {"reason": "lake down"},
                              next_at=clock() + HOURS)
    r.start()
    try:
        r.tick()
        assert state(r, far) is State.COMPLETE
        assert state(r, near) is State.RETRY_WAIT    # a real backoff is still waited out
    finally:
        r.stop()
        r.shutdown(grace_s=1)


@pytest.mark.parametrize("waiting", [State.TRANSFERRED, State.CONFIRMED])
def test_a_step_back_makes_confirmation_and_keep_waits_due(make_runner: Any, tmp_path: Path, clock: Any,
                                                          mono: Mono, waiting: State) -> None:
    r = make_runner()
    f = tmp_path / "daq" / "f.fits"
    f.write_bytes(b"x")
    rec = r.ledger.transition(discover(r, f).id, State.DISCOVERED, Event.COMPLETED)
    for frm, ev in ((State.COMPLETE, Event.HASHED), (State.HASHED, Event.REGISTERED),
                    (State.REGISTERED, Event.COPIED), (State.COPIED, Event.TRANSFERRED),
                    (State.TRANSFERRED, Event.CONFIRMED)):
        if frm is waiting:
            break
        rec = r.ledger.transition(rec.id, frm, ev)
    r.ledger.set_next_at(rec.id, clock() + 24 * 3600)    # a confirmation re-check, or a keep period
    r.tick()
    assert r.ledger.due([waiting], clock(), 5) == []
    clock.advance(-HOURS)
    mono.now += 0.5
    r.tick()
    assert [x.id for x in r.ledger.due([waiting], clock(), 5)] == [rec.id]   # the step decides again


def test_a_step_back_does_not_pause_the_periodic_rescans_and_checks(make_runner: Any, clock: Any) -> None:
    r = make_runner()
    r.start()
    try:
        r.tick()
        # where a step back by three hours leaves the scheduler's next runs (wall times)
        for job in r.scheduler.get_jobs():
            job.modify(next_run_time=job.next_run_time + dt.timedelta(seconds=HOURS))
        clock.advance(-HOURS)
        r.tick()
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)
        jobs = r.scheduler.get_jobs()
        assert {"backlog", "disks", "lake", "rescan"} <= {j.id for j in jobs}
        assert sorted(j.id for j in jobs if j.next_run_time <= soon) == sorted(j.id for j in jobs)
    finally:
        r.stop()
        r.shutdown(grace_s=1)
