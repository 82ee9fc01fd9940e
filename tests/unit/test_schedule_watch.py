"""The schedule's alarms kept from the ledger (edge_agent/schedule.py), on a fake clock: what the
metrics, /status and the alert rules read."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path
from typing import Any, Callable

from edge_agent.ledger import Ledger
from edge_agent.schedule import ScheduleWatch
from edge_agent.settings import Settings

CANARY = zoneinfo.ZoneInfo("Atlantic/Canary")


def at(day: int, hour: int, minute: int = 0) -> float:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=CANARY).timestamp()


def test_the_alarms_follow_what_arrives(tmp_path: Path, clock: Any, settings_data: Callable[..., Any],
                                        capsys: Any) -> None:
    s = Settings(**settings_data(tmp_path, rule={"timezone": "Atlantic/Canary", "expected": {
        "hours": ["20:00-06:00"], "quiet_minutes": 30, "min_files_per_hour": 3}}))
    clock.now = at(7, 12)
    ledger = Ledger(s.ledger_path, clock=clock)
    try:
        watch = ScheduleWatch(s, ledger, clock, started_at=clock())

        def arrive(name: str) -> None:
            # written just before it is found (its mtime: what "outside" judges by)
            ledger.discover("r", str(tmp_path / "daq" / name).encode(), name, 1, 1, 1, int((clock() - 5) * 1e9), 0)
        arrive("early.fits")                      # noon: outside the expected time
        watch.sample()
        st = watch.report()["r"]
        assert st["expected"] is False and st["alarms"] == {"quiet": False, "outside": True, "slow": False}
        clock.now = at(7, 20, 10)                 # the window opens; the noon file is an hour old
        watch.sample()
        st = watch.report()["r"]
        assert st["expected"] and not any(st["alarms"].values()) and st["window"] == "20:00-06:00 (Atlantic/Canary)"
        clock.now = at(7, 20, 31)                 # nothing since the window opened
        watch.sample()
        assert watch.report()["r"]["alarms"]["quiet"]
        assert "schedule alarm" in capsys.readouterr().out
        for i in range(2):                        # files come, but too few for min_files_per_hour
            clock.now = at(7, 20, 40 + i)
            arrive(f"f{i}.fits")
        watch.sample()
        st = watch.report()["r"]
        assert not st["alarms"]["quiet"] and not st["alarms"]["slow"] and st["files_last_hour"] == 2
        clock.now = at(7, 21, 5)                  # an hour into the window: 2 < 3 in the last hour
        watch.sample()
        assert watch.report()["r"]["alarms"]["slow"]
        arrive("f2.fits")
        watch.sample()
        assert not watch.report()["r"]["alarms"]["slow"] and watch.outside_total["r"] == 0
        # a restart keeps the last hour's arrivals (read from the ledger)
        again = ScheduleWatch(s, ledger, clock, started_at=clock())
        again.sample()
        assert again.report()["r"]["files_last_hour"] == 3
    finally:
        ledger.close()


def test_a_restart_finding_last_nights_files_raises_no_outside_alarm(tmp_path: Path, clock: Any,
                                                                    settings_data: Callable[..., Any]) -> None:
    """Review of issue 16 (9): files written in the night and found by a restart at 09:00 were
    judged by their discovery: "outside" fired, and each counted as outside the window."""
    s = Settings(**settings_data(tmp_path, rule={"timezone": "Atlantic/Canary", "expected": {"hours": ["20:00-06:00"]}}))
    clock.now = at(8, 9)
    ledger = Ledger(s.ledger_path, clock=clock)
    try:
        for i in range(3):
            ledger.discover("r", b"/daq/n%d" % i, f"n{i}", 1, 1, 1, int(at(8, 2, i) * 1e9), 0)
        watch = ScheduleWatch(s, ledger, clock, started_at=clock())
        watch.sample()
        assert watch.report()["r"]["alarms"]["outside"] is False
        ledger.discover("r", b"/daq/day", "day", 1, 1, 1, int((clock() - 1) * 1e9), 0)   # written now: outside
        watch.sample()
        assert watch.report()["r"]["alarms"]["outside"] is True and watch.outside_total["r"] == 1
    finally:
        ledger.close()
