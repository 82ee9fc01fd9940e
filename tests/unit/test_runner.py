"""A ledger that cannot be written stops new work; a probe write that succeeds resumes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from edge_agent.app import build_catalogue
from edge_agent.core.lifecycle import Event, State
from edge_agent.errors import LedgerUnwritable
from edge_agent.ledger import Ledger
from edge_agent.runner import Runner
from edge_agent.settings import Settings
from edge_agent.status.report import readiness


@pytest.fixture
def runner(tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> Any:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    s = Settings(**settings_data(tmp_path))
    ledger = Ledger(s.ledger_path, clock=clock)
    r = Runner(s, ledger, build_catalogue(s), clock=clock, monotonic=clock)
    yield r
    for pool in r.pools.values():
        pool.shutdown()
    ledger.close()


def test_the_runner_pauses_while_the_ledger_cannot_be_written_and_resumes_after(
        runner: Runner, clock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "daq" / "f.fits").write_bytes(b"x")
    real_discover, real_set_meta = runner.ledger.discover_many, runner.ledger.set_meta

    def full(*a: Any, **k: Any) -> Any:
        raise LedgerUnwritable("the ledger l.sqlite cannot be written: database or disk is full")

    monkeypatch.setattr(runner.ledger, "discover_many", full)   # what a rescan writes with
    monkeypatch.setattr(runner.ledger, "set_meta", full)
    with pytest.raises(LedgerUnwritable):
        runner.tick()                     # run_forever hands this to _ledger_down
    runner._ledger_down("the ledger l.sqlite cannot be written: database or disk is full")
    assert readiness(runner, clock()) == ["ledger: the ledger l.sqlite cannot be written: database or disk is full"]
    runner.tick()                         # paused: the failed probe means no scan, no discovery
    assert runner.last_tick == clock() and runner.ledger.in_states([State.DISCOVERED]) == []
    monkeypatch.setattr(runner.ledger, "discover_many", real_discover)
    monkeypatch.setattr(runner.ledger, "set_meta", real_set_meta)
    runner.tick()                         # the next probe is not due yet
    assert runner.ledger_problem is not None
    clock.advance(2)
    runner.tick()
    assert runner.ledger_problem is None and readiness(runner, clock()) == []
    assert [r.relpath for r in runner.ledger.in_states([State.DISCOVERED])] == ["f.fits"]


class Pool:
    """Records the jobs handed over instead of running them."""

    def __init__(self) -> None:
        self.jobs: list[list[Any]] = []

    def submit(self, fn: Any, pool: str, batch: list[Any]) -> None:
        self.jobs.append(batch)

    def shutdown(self, **kw: Any) -> None:
        pass


def recording_runner(tmp_path: Path, clock: Any, settings_data: Callable[..., Any],
                     **settings: Any) -> tuple[Runner, Ledger]:
    """A runner whose pools record the jobs handed over instead of running them."""
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    s = Settings(**settings_data(tmp_path, **settings))
    ledger = Ledger(s.ledger_path, clock=clock)
    r = Runner(s, ledger, build_catalogue(s), clock=clock, monotonic=clock)
    for pool in r.pools.values():
        pool.shutdown()
    r.pools = {name: Pool() for name in r.pools}   # type: ignore[misc]
    return r, ledger


def hashed(ledger: Ledger, tmp_path: Path, name: str, dataset: str) -> None:
    rec = ledger.discover("r", str(tmp_path / "daq" / name).encode(), name, 1, 1, 1, 1, 0)
    ledger.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
    ledger.transition(rec.id, State.COMPLETE, Event.HASHED, blake3=name, adler32="00000001", size=1,
                      scope="test", name=name, dataset=dataset)


def test_catalogue_work_goes_in_batches_of_one_dataset(tmp_path: Path, clock: Any,
                                                       settings_data: Callable[..., Any]) -> None:
    r, ledger = recording_runner(tmp_path, clock, settings_data, lake_batch_files=2, lake_workers=3)
    for i in range(5):
        hashed(ledger, tmp_path, f"a{i}", "ds.a")
    hashed(ledger, tmp_path, "b0", "ds.b")
    r.dispatch(clock())
    jobs = r.pools["lake"].jobs                    # type: ignore[attr-defined]
    # three workers: three jobs, each of one dataset, none over lake_batch_files
    assert len(jobs) == 3 and r.jobs["lake"] == 3
    assert all(len(j) <= 2 and len({rec.dataset for rec in j}) == 1 for j in jobs)
    assert len(r.in_flight) == sum(len(j) for j in jobs)
    r.dispatch(clock())                            # every worker busy: nothing more is handed over
    assert len(r.pools["lake"].jobs) == 3          # type: ignore[attr-defined]
    ledger.close()


def _rec(i: int, size: int) -> Any:
    from types import SimpleNamespace
    return SimpleNamespace(id=i, size=size)      # all that sharing out looks at


@pytest.mark.parametrize("sizes, workers, expected", [
    ([1] * 3, 2, [[0, 1], [2]]),                        # a few small files: over every free worker
    ([1] * 100, 2, [list(range(50)), list(range(50, 100))]),  # a backlog: shared evenly ...
    ([1] * 300, 2, [list(range(128)), list(range(128, 256))]),  # ... in groups of at most JOB_FILES
    ([1 << 30] * 3, 4, [[0], [1], [2]]),                # large files: each on a worker of its own
    ([40 << 20] * 3, 1, [[0]]),                         # together over JOB_BYTES: one at a time
    ([1] * 5, 1, [[0, 1, 2, 3, 4]]),
    ([], 3, []),
])
def test_per_file_work_is_shared_out_over_the_free_workers(sizes: list[int], workers: int,
                                                           expected: list[list[int]]) -> None:
    from edge_agent.runner import share_out
    jobs = share_out([_rec(i, n) for i, n in enumerate(sizes)], workers)
    assert [[r.id for r in job] for job in jobs] == expected


def test_a_backlog_of_small_files_is_handed_to_the_hashing_workers_in_groups(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> None:
    """One file per job meant one dispatch (a tick of the main loop) per file: the loop, not the
    workers, set the pace of a night of small files."""
    r, ledger = recording_runner(tmp_path, clock, settings_data, hash_workers=2)
    for i in range(10):
        rec = ledger.discover("r", str(tmp_path / "daq" / f"f{i}").encode(), f"f{i}", 1, i + 1, 100, 1, 0)
        ledger.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
    r.dispatch(clock())
    jobs = r.pools["hash"].jobs                    # type: ignore[attr-defined]
    assert [len(j) for j in jobs] == [5, 5]
    assert len(r.in_flight) == 10 and r.jobs["hash"] == 2
    ledger.close()


def test_steps_ending_in_a_burst_wake_the_loop_a_bounded_number_of_times(
        runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step that ends wakes the loop; a tick per step meant the loop's own reads grew with the
    files per second and took the ledger from the workers."""
    import threading
    import time

    from edge_agent.runner import MIN_TICK_GAP_S
    ticks: list[float] = []
    monkeypatch.setattr(runner, "start", lambda: None)
    monkeypatch.setattr(runner, "shutdown", lambda: None)
    monkeypatch.setattr(runner, "tick", lambda: ticks.append(time.monotonic()))
    th = threading.Thread(target=runner.run_forever)
    th.start()
    burst = 0.4
    end = time.monotonic() + burst
    while time.monotonic() < end:
        runner.wake.set()
        time.sleep(0.0005)
    runner.stop()
    th.join(5)
    assert len(ticks) >= 3                                 # woken, not waiting a whole tick_seconds
    assert len(ticks) <= burst / MIN_TICK_GAP_S + 3
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) >= MIN_TICK_GAP_S * 0.9


def test_a_step_failing_for_a_whole_batch_is_said_and_its_files_looked_at_later(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """R7 (review 2026-12-07): an error outside every file's own handling (a batch's bookkeeping)
    was dropped by the pool's thread without a word, and the batch dispatched again at every tick."""
    from edge_agent import logs, steps
    logs.setup("info", "json")
    r, ledger = recording_runner(tmp_path, clock, settings_data)
    hashed(ledger, tmp_path, "a0", "ds.a")
    rec = ledger.in_states([State.HASHED])[0]

    def broken(batch: Any, ctx: Any) -> None:
        raise RuntimeError("bookkeeping broke")
    monkeypatch.setattr(steps, "run", broken)
    r._run("lake", [rec])
    err = capsys.readouterr().err
    assert "step failed for a whole batch" in err and "bookkeeping broke" in err
    assert ledger.get(rec.id).next_at == clock() + r.settings.confirm_interval_seconds
    assert not r.in_flight
    ledger.close()


# ---------------------------------------------------------------- a shared ledger: claims (issue 15)

def test_an_agent_of_a_shared_ledger_claims_what_it_dispatches_and_leaves_what_another_holds(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent import steps
    r, ledger = recording_runner(tmp_path, clock, settings_data, lake_batch_files=10,
                                 rule={"completion": ["renamed"]}, ledger={"agent_id": "a1", "lease_seconds": 60})
    for i in range(4):
        hashed(ledger, tmp_path, f"a{i}", "ds.a")
    theirs = ledger.claim("a2", [State.HASHED], clock(), 1, lease_s=60)      # another agent holds one
    r.dispatch(clock())
    [job] = r.pools["lake"].jobs                   # type: ignore[attr-defined]
    assert theirs[0].id not in {rec.id for rec in job} and len(job) == 3
    assert {ledger.get(rec.id).claim_owner for rec in job} == {"a1"}
    # renewed while the step runs, released when it ends
    clock.advance(50)
    r.renew_claims()
    assert {ledger.get(rec.id).claim_until for rec in job} == {clock() + 60}
    monkeypatch.setattr(steps, "run", lambda batch, ctx: None)
    r._run("lake", job)
    # released: the lease ended (anybody may claim them), the mark stays until another agent does
    assert {(ledger.get(rec.id).claim_owner, ledger.get(rec.id).claim_until) for rec in job} == {("a1", 0)}
    assert ledger.get(theirs[0].id).claim_owner == "a2"
    assert {r.id for r in ledger.claim("a2", [State.HASHED], clock(), 10, lease_s=60)} >= {rec.id for rec in job}
    r.heartbeat()
    assert [(a["agent_id"], a["claims"]) for a in ledger.agents()] == [("a1", 0)]
    ledger.close()


def test_a_step_of_an_agent_whose_file_another_agent_took_over_commits_nothing(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> None:
    """An agent stalled past its lease (SIGSTOP); another took its files and moved them on: the
    stalled agent's step, resumed, commits nothing over that work."""
    from edge_agent.ledger import StaleTransition
    r, ledger = recording_runner(tmp_path, clock, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1", "lease_seconds": 60})
    hashed(ledger, tmp_path, "a0", "ds.a")
    r.dispatch(clock())
    [[rec]] = r.pools["lake"].jobs                 # type: ignore[attr-defined]
    clock.advance(120)                             # a1 stalls past its lease ...
    ledger.claim("a2", [State.HASHED], clock(), 1, lease_s=60)                # ... a2 takes the file
    with pytest.raises(StaleTransition):
        r.context.move(rec, Event.REGISTERED)
    assert ledger.get(rec.id).state is State.HASHED
    assert r.context.move_many([(rec, Event.REGISTERED, None, {})]) == {}
    ledger.close()


def test_without_a_shared_ledger_nothing_is_claimed(tmp_path: Path, clock: Any,
                                                    settings_data: Callable[..., Any]) -> None:
    r, ledger = recording_runner(tmp_path, clock, settings_data)
    hashed(ledger, tmp_path, "a0", "ds.a")
    r.dispatch(clock())
    [[rec]] = r.pools["lake"].jobs                 # type: ignore[attr-defined]
    assert r.agent_id is None and ledger.get(rec.id).claim_owner is None
    ledger.close()


def test_files_claimed_but_handed_to_no_worker_are_given_back(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> None:
    """Review of 2026-12-07 (claims, 1): rows claimed beyond the free workers (or of a buffer another
    agent holds) were kept, renewed by every dispatch, and another agent never got them."""
    r, ledger = recording_runner(tmp_path, clock, settings_data, lake_batch_files=2, lake_workers=1,
                                 rule={"completion": ["renamed"]}, ledger={"agent_id": "a1", "lease_seconds": 60})
    hashed(ledger, tmp_path, "a0", "ds.a")
    hashed(ledger, tmp_path, "b0", "ds.b")
    r.dispatch(clock())
    [[handed]] = r.pools["lake"].jobs              # type: ignore[attr-defined]
    [other] = [rec for rec in ledger.iter_all() if rec.id != handed.id]
    assert (other.claim_owner, other.claim_until) in ((None, None), ("a1", 0))
    assert [rec.id for rec in ledger.claim("a2", [State.HASHED], clock(), 5, lease_s=60)] == [other.id]
    ledger.close()


def test_a_step_starts_no_effect_once_its_claim_is_no_longer_firmly_held(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> None:
    """The ledger fences a stalled agent's commits, not its effects (a copy written, an unlink): a
    step checks its claim before each. Renewals failing for a third of the lease stop new effects."""
    from edge_agent.ledger import StaleTransition
    r, ledger = recording_runner(tmp_path, clock, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1", "lease_seconds": 60})
    hashed(ledger, tmp_path, "a0", "ds.a")
    r.dispatch(clock())
    [[rec]] = r.pools["lake"].jobs                 # type: ignore[attr-defined]
    r.context.check_claim(rec)                     # just claimed: firm
    clock.advance(39)                              # one renewal missed: still firm
    r.context.check_claim(rec)
    clock.advance(2)                               # two missed: a third of the lease is all that is left
    with pytest.raises(StaleTransition, match="no longer firmly held"):
        r.context.check_claim(rec)
    r.in_flight[rec.id] = "lake"
    r.renew_claims()                               # renewed: firm again
    r.context.check_claim(rec)
    clock.advance(30)
    ledger.claim("a2", [State.HASHED], clock() + 100, 1, lease_s=60)   # a2 took it (a1's lease ran out)
    r.renew_claims()                               # the renewal finds it lost: no effect from now on
    with pytest.raises(StaleTransition):
        r.context.check_claim(rec)
    ledger.close()


def test_an_agent_stops_when_another_enrols_under_its_id(tmp_path: Path, clock: Any,
                                                         settings_data: Callable[..., Any]) -> None:
    r, ledger = recording_runner(tmp_path, clock, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1", "lease_seconds": 60})
    r.heartbeat()
    assert not r.stopping.is_set() and ledger.agents()[0]["agent_id"] == "a1"
    # another process under the same id, having found this one silent (a stall, a partition)
    clock.advance(600)
    ledger.enrol("a1", "other-machine:/srv/state", "daq-9", 99, "0", clock(), fresh_s=90)
    r.heartbeat()
    assert r.stopping.is_set() and r.agent_id_lost and "another edge-agent now runs under this id" in r.agent_id_lost


def test_the_heartbeat_reports_what_the_agent_did_since_the_last_one_recorded(
        tmp_path: Path, clock: Any, settings_data: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet view's throughput (issue 15): each heartbeat carries the agent's own figures over
    its interval; a heartbeat the ledger could not take is covered by the next one."""
    from types import SimpleNamespace
    r, ledger = recording_runner(tmp_path, clock, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1", "lease_seconds": 60})
    r.heartbeat()
    assert ledger.agents()[0]["stats"]["sent_bytes"] == 0
    clock.advance(30)
    r._on_sent("r", "a", 30_000)
    r._on_hashed("r", 60_000)
    for state in (State.TRANSFERRED, State.TRANSFERRED, State.TRANSFERRED, State.DELETED, State.HASHED):
        r._on_transition(SimpleNamespace(rule="r", state=state))  # type: ignore[arg-type]
    r.in_flight[99] = "lake"
    r.heartbeat()
    assert ledger.agents()[0]["stats"] == {
        "interval_s": 30.0, "sent_bytes_per_s": 1000.0, "hashed_bytes_per_s": 2000.0,
        "transferred_files_per_s": 0.1, "deleted_files_per_s": 0.033, "sent_bytes": 30_000,
        "files_transferred": 3, "files_deleted": 1, "in_flight": 1, "rules": ["r"],
        "close_nights": []}
    assert ledger.agents()[0]["heartbeat_at"] == clock()

    def unwritable(*args: Any, **kw: Any) -> None:
        raise LedgerUnwritable("the ledger cannot be written")
    clock.advance(30)
    r._on_sent("r", "a", 30_000)
    monkeypatch.setattr(ledger, "heartbeat", unwritable)
    r.heartbeat()                                    # said in the log, not raised
    monkeypatch.undo()
    clock.advance(30)
    r.heartbeat()
    st = ledger.agents()[0]["stats"]
    assert (st["interval_s"], st["sent_bytes_per_s"], st["sent_bytes"]) == (60.0, 500.0, 60_000)
    ledger.close()
