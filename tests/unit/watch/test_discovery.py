"""A rescan of a large tree works in batches: every file found once, work dispatched while the walk
goes on, vanished files still noticed; completion pages through a large backlog (issue 5, scale)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from edge_agent.watch import discovery as discovery_mod
from edge_agent.app import build_catalogue
from edge_agent.core.lifecycle import Event, State
from edge_agent.ledger import Ledger
from edge_agent.runner import Runner
from edge_agent.settings import Settings


@pytest.fixture
def runner(tmp_path: Path, clock: Any, settings_data: Callable[..., Any],
           monkeypatch: pytest.MonkeyPatch) -> Any:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    monkeypatch.setattr(discovery_mod, "RESCAN_BATCH", 3)    # 10 files make 4 batches
    s = Settings(**settings_data(tmp_path, rule={"completion": ["renamed"]}))
    ledger = Ledger(s.ledger_path, clock=clock, synchronous="normal")
    r = Runner(s, ledger, build_catalogue(s), clock=clock)
    yield r
    for pool in r.pools.values():
        pool.shutdown()
    ledger.close()


def make(tmp_path: Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        sub = tmp_path / "daq" / f"run{i % 2}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:02d}.fits").write_bytes(b"x" * (i + 1))
        names.append(f"run{i % 2}/f{i:02d}.fits")
    return names


def states(r: Runner) -> dict[str, State]:
    return {rec.relpath: rec.state for rec in r.ledger.iter_all()}


def test_a_rescan_in_batches_finds_every_file_once_and_dispatches_before_the_walk_ends(
        runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = make(tmp_path, 10)
    seen_at_dispatch: list[tuple[int, int]] = []     # (rows in the ledger, rows complete) at each dispatch
    monkeypatch.setattr(runner, "dispatch", lambda now: seen_at_dispatch.append(
        (len(states(runner)), sum(1 for s in states(runner).values() if s is State.COMPLETE))))
    runner.discovery.rescan("r")
    assert sorted(states(runner)) == sorted(names)
    # the first dispatch came after the first batch, with its files already complete
    assert seen_at_dispatch[0] == (3, 3)
    assert len(seen_at_dispatch) == 4
    runner.discovery.rescan("r")                     # nothing new: no second version of anything
    assert len(list(runner.ledger.iter_all())) == 10


def test_a_file_removed_before_hashing_is_superseded_by_the_next_rescan(
        runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, 5)
    monkeypatch.setattr(runner, "dispatch", lambda now: None)
    runner.discovery.rescan("r")
    os.unlink(tmp_path / "daq" / "run0" / "f02.fits")
    runner.discovery.rescan("r")
    st = states(runner)
    assert st["run0/f02.fits"] is State.SUPERSEDED
    assert sum(1 for s in st.values() if s is State.SUPERSEDED) == 1


def test_a_file_that_changed_since_discovery_is_looked_at_again_by_a_rescan(
        runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, 4)
    monkeypatch.setattr(runner, "dispatch", lambda now: None)
    monkeypatch.setattr(runner.discovery, "check_completion", lambda now, budget=0: None)
    runner.discovery.rescan("r")
    (tmp_path / "daq" / "run1" / "f01.fits").write_bytes(b"longer now")
    runner.discovery.rescan("r")
    rec = next(r for r in runner.ledger.iter_all() if r.relpath == "run1/f01.fits")
    assert rec.state is State.DISCOVERED and rec.size == len(b"longer now")
    assert len(list(runner.ledger.iter_all())) == 4


def test_completion_pages_through_a_backlog_and_wraps_around(runner: Runner, tmp_path: Path, clock: Any) -> None:
    make(tmp_path, 5)
    root = os.fsencode(tmp_path / "daq")
    for p in sorted((tmp_path / "daq").rglob("*.fits")):
        st = p.stat()
        runner.ledger.discover("r", os.fsencode(p), os.path.relpath(os.fsencode(p), root).decode(), st.st_dev,
                               st.st_ino, st.st_size, st.st_mtime_ns, 0)
    done = []
    for _ in range(3):
        runner.discovery.check_completion(clock(), budget=2)
        done.append(sum(1 for s in states(runner).values() if s is State.COMPLETE))
    assert done == [2, 4, 5]
    assert runner.discovery._completion_cursor == 0


def test_ledger_batch_calls(tmp_path: Path, clock: Any) -> None:
    led = Ledger(tmp_path / "l.sqlite", clock=clock, synchronous="normal")
    try:
        led.notice("r", b"/d/a", "stale-temporary", "x")
        found = [(f"/d/{c}".encode(), c, 1, i, 10, 5) for i, c in enumerate("abc")]
        assert led.discover_many("r", found, 0) == 3
        assert led.notices(10) == []                       # discovery clears the path's notice
        assert led.discover_many("r", found[:2], 0) == 0   # live rows are left alone
        ids = [r.id for r in led.iter_all()]
        led.transition(ids[0], State.DISCOVERED, Event.COMPLETED)
        assert led.transition_many(ids, State.DISCOVERED, Event.COMPLETED, next_at=0) == ids[1:]
        assert {r.state for r in led.iter_all()} == {State.COMPLETE}
        assert [r.id for r in led.in_states([State.COMPLETE], after_id=ids[0], limit=1)] == [ids[1]]
        assert led.ids_in_state([*ids, 999], State.COMPLETE) == set(ids)
        assert set(led.live_many("r", [b"/d/a", b"/d/z"])) == {b"/d/a"}
        assert led.live_stats("r", [b"/d/b", b"/d/z"]) == {b"/d/b": (ids[1], 1, 10, 5)}
        assert led.unhashed_paths([State.COMPLETE], "r", ids[0], 5) == [(ids[1], b"/d/b"), (ids[2], b"/d/c")]
        # the dispatch query reads the queue index in order instead of sorting the whole backlog
        plan = " ".join(r[3] for r in led._query(
            "EXPLAIN QUERY PLAN SELECT * FROM files INDEXED BY files_queue WHERE state = ? AND next_at <= ? "
            "ORDER BY priority DESC, next_at, id LIMIT ?", ["complete", 1.0, 4]))
        assert "files_queue" in plan and "TEMP B-TREE FOR ORDER BY" not in plan, plan
        led.transition(ids[1], State.COMPLETE, Event.HASHED)
        assert [r.id for r in led.due([State.HASHED, State.COMPLETE], clock(), 2)] == [ids[0], ids[1]]
        assert [r.id for r in led.due([State.HASHED, State.COMPLETE], clock(), 5, exclude=[ids[0]])] == ids[1:]
    finally:
        led.close()


def test_a_file_another_agent_of_the_fleet_works_on_is_left_to_its_step(
        runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Any) -> None:
    """A shared ledger: a file removed (or changed) while another agent's step holds it is that
    step's to notice, as for this agent's own steps; released (lease 0), it is anybody's again."""
    make(tmp_path, 3)
    monkeypatch.setattr(runner, "dispatch", lambda now: None)
    runner.discovery.rescan("r")
    [held] = runner.ledger.claim("a2", [State.COMPLETE], clock(), 1, lease_s=60)
    os.unlink(held.fspath)
    runner.discovery.rescan("r")
    assert runner.ledger.get(held.id).state is State.COMPLETE    # a2's step notices it
    runner.ledger.release("a2", [held.id])
    runner.discovery.rescan("r")
    assert runner.ledger.get(held.id).state is State.SUPERSEDED


def test_a_dead_agents_expired_claim_does_not_keep_a_row_from_discovery(
        runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Any) -> None:
    """Review of 2026-12-07 (fleet, 5): a2 claimed a file and died without giving it back: once the
    lease has run out the row is anybody's, also for discovery (it stayed wedged for ever)."""
    make(tmp_path, 3)
    monkeypatch.setattr(runner, "dispatch", lambda now: None)
    runner.discovery.rescan("r")
    [held] = runner.ledger.claim("a2", [State.COMPLETE], clock(), 1, lease_s=60)
    os.unlink(held.fspath)
    runner.discovery.rescan("r")
    assert runner.ledger.get(held.id).state is State.COMPLETE    # a2's lease runs: its step's to see
    clock.advance(61)                                            # a2 died; its lease ran out
    runner.discovery.rescan("r")
    assert runner.ledger.get(held.id).state is State.SUPERSEDED
