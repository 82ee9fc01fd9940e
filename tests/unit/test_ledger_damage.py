"""A ledger deleted, replaced or corrupted under the running agent stops new work for good and
/readyz says why (a real SQLite file, damaged the way a person or a disk would)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.app import build_catalogue
from edge_agent.core.lifecycle import State
from edge_agent.errors import LedgerUnwritable
from edge_agent.ledger import Ledger, LedgerDamaged
from edge_agent.runner import Runner
from edge_agent.settings import Settings
from edge_agent.status.report import readiness


def corrupt_after_schema(path: Path) -> None:
    """Overwrite every page but the first of a closed ledger with garbage, the way a failing disk
    would: the schema the next open reads first is cached by then, the rows are not."""
    db = sqlite3.connect(path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        for off in range(page_size, size, page_size):
            fh.seek(off)
            fh.write(b"\xa5" * page_size)


def filled(path: Path, clock: Any, n: int = 300) -> None:
    """A closed ledger (everything checkpointed into the main file) with n discovered rows."""
    led = Ledger(path, clock=clock)
    led.discover_many("r", [(f"/daq/f{i}.fits".encode(), f"f{i}.fits", 1, i, 10, 1) for i in range(n)], 0)
    led.close()


# ------------------------------------------------------------------ the ledger's probe
def test_probe_is_quiet_on_a_healthy_ledger(tmp_path: Path, clock: Any) -> None:
    led = Ledger(tmp_path / "l.sqlite", clock=clock)
    assert led.probe() is None and led.probe() is None
    led.close()


def test_an_unlinked_ledger_is_reported_and_stays_reported(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "l.sqlite"
    led = Ledger(path, clock=clock)
    for p in tmp_path.iterdir():          # `rm ledger.sqlite*`
        p.unlink()
    led.set_meta("k", "v")                # SQLite goes on writing into the unlinked file ...
    why = led.probe()                     # ... which the probe sees
    assert why is not None and str(path) in why and "deleted" in why
    Ledger(path, clock=clock).close()     # a new file under the name does not make it whole again
    assert led.probe() == why
    led.close()


def test_a_ledger_replaced_by_another_file_is_reported(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "l.sqlite"
    led = Ledger(path, clock=clock)
    Ledger(tmp_path / "other.sqlite", clock=clock).close()
    os.replace(tmp_path / "other.sqlite", path)      # a backup "restored" under the running agent
    why = led.probe()
    assert why is not None and "replaced" in why
    led.close()


def test_a_corrupt_ledger_raises_damaged_on_reads_and_the_probe_keeps_it(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "l.sqlite"
    filled(path, clock)
    led = Ledger(path, clock=clock)
    assert led.probe() is None
    corrupt_after_schema(path)
    with pytest.raises(LedgerDamaged) as err:
        led.in_states([State.DISCOVERED])
    assert isinstance(err.value, LedgerUnwritable)   # what the runner and the pipeline stop on
    why = led.probe()
    assert why is not None and "malformed" in why
    assert led.probe() == why                        # sticky: a corrupt file does not heal
    led.close()


# ------------------------------------------------------------------ the runner and /readyz
@pytest.fixture
def make_runner(tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> Iterator[Callable[[], Runner]]:
    made: list[Runner] = []

    def make() -> Runner:
        for d in ("daq", "lake-a", "lake-b"):
            (tmp_path / d).mkdir(exist_ok=True)
        s = Settings(**settings_data(tmp_path))
        r = Runner(s, Ledger(s.ledger_path, clock=clock), build_catalogue(s), clock=clock)
        made.append(r)
        return r
    yield make
    for r in made:
        for pool in r.pools.values():
            pool.shutdown()
        r.ledger.close()


def test_an_unlinked_ledger_stops_the_runner_and_readyz_names_it(
        make_runner: Callable[[], Runner], clock: Any, tmp_path: Path) -> None:
    runner = make_runner()
    runner.check_ledger()
    assert runner.ledger_problem is None and readiness(runner, clock()) == []
    for p in runner.ledger.path.parent.glob("ledger*"):
        p.unlink()
    (tmp_path / "daq" / "f.fits").write_bytes(b"x")
    runner.check_ledger()                 # the periodic probe
    why = readiness(runner, clock())
    assert len(why) == 1 and why[0].startswith("ledger: ") and "deleted" in why[0]
    for _ in range(3):                    # a write probe would succeed (into the unlinked file):
        clock.advance(5)                  # it must not resume work
        runner.tick()
    assert runner.ledger_problem is not None
    assert runner.ledger.in_states([State.DISCOVERED]) == []


def test_a_corrupt_ledger_stops_the_runner_and_readyz_names_it(
        make_runner: Callable[[], Runner], clock: Any, tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    filled(Settings(**settings_data(tmp_path)).ledger_path, clock)
    runner = make_runner()
    corrupt_after_schema(runner.ledger.path)
    with pytest.raises(LedgerUnwritable):   # run_forever hands it to _ledger_down
        runner.tick()
    runner.check_ledger()
    why = readiness(runner, clock())
    assert len(why) == 1 and why[0].startswith("ledger: ") and "malformed" in why[0]
    clock.advance(5)
    runner.tick()                           # paused, and stays so
    assert runner.ledger_problem is not None
