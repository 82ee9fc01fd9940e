"""The observing schedule (issue 16, part 3): when data are expected, and the alarms "quiet",
"outside" and "slow", on a fake clock."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from edge_agent.core.schedule import HOUR, Expected, Seen, Site, Span, alarms, sun_altitude

CANARY = zoneinfo.ZoneInfo("Atlantic/Canary")
LA_PALMA = Site(28.7606, -17.8814, 2200)
NIGHT = Expected(spans=(Span(dt.time(20), dt.time(6)),), quiet_minutes=30, min_files_per_hour=10)


def at(day: int, hour: int, minute: int = 0, tz: dt.tzinfo = CANARY) -> float:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=tz).timestamp()


@pytest.mark.parametrize(("hour", "expected"), [(19, False), (20, True), (23, True), (0, True), (5, True),
                                                (6, False), (12, False)])
def test_hours_crossing_midnight_are_local_time(hour: int, expected: bool) -> None:
    assert NIGHT.expected(at(7, hour, 30 if hour == 5 else 0), CANARY) is expected
    # the same instant in another zone is another local hour: the rule's zone decides
    assert NIGHT.expected(at(7, hour), CANARY) == NIGHT.expected(at(7, hour) + 0.0, CANARY)


def test_the_night_follows_the_sun_at_the_site() -> None:
    astro = Expected(night="astronomical", site=LA_PALMA)
    civil = Expected(night="civil", site=LA_PALMA)
    assert astro.expected(at(7, 23), CANARY) and not astro.expected(at(7, 13), CANARY)
    # 19:00 in December (the sun at -10 degrees): civil twilight is over, astronomical not yet
    assert civil.expected(at(7, 19, 0), CANARY) and not astro.expected(at(7, 18, 50), CANARY)
    assert sun_altitude(LA_PALMA, at(7, 13, 30)) > 30 > sun_altitude(LA_PALMA, at(7, 8))
    # polar summer: the sun never goes below -18: no night, no alarm
    svalbard = Expected(night="astronomical", site=Site(78.2, 15.6))
    june = dt.datetime(2026, 6, 21, 0, 0, tzinfo=dt.timezone.utc).timestamp()
    assert not any(svalbard.expected(june + h * HOUR, dt.timezone.utc) for h in range(24))
    assert svalbard.next_change(june, dt.timezone.utc) is None


def test_quiet_fires_after_quiet_minutes_without_a_file_while_expected() -> None:
    started = at(7, 12)
    last = at(7, 21)
    assert not alarms(NIGHT, at(7, 21, 29), CANARY, Seen(last, [(last, True)]), started)["quiet"]
    assert alarms(NIGHT, at(7, 21, 31), CANARY, Seen(last, []), started)["quiet"]
    # counted from the moment data became expected, not from yesterday's last file
    yesterday = at(7, 5)
    assert not alarms(NIGHT, at(7, 20, 20), CANARY, Seen(yesterday, []), started)["quiet"]
    assert alarms(NIGHT, at(7, 20, 32), CANARY, Seen(yesterday, []), started)["quiet"]
    # never while data are not expected, and not before the agent has watched for quiet_minutes
    assert not alarms(NIGHT, at(8, 12), CANARY, Seen(yesterday, []), started)["quiet"]
    assert not alarms(NIGHT, at(7, 23), CANARY, Seen(None, []), at(7, 22, 45))["quiet"]
    assert alarms(NIGHT, at(7, 23, 16), CANARY, Seen(None, []), at(7, 22, 45))["quiet"]


def test_outside_fires_for_an_hour_after_a_file_arrived_outside_the_expected_time() -> None:
    noon = at(7, 12)
    seen = Seen(noon, [(noon, False)])
    assert alarms(NIGHT, noon + 60, CANARY, seen, at(7, 0))["outside"]
    assert not alarms(NIGHT, noon + HOUR + 60, CANARY, seen, at(7, 0))["outside"]
    assert not alarms(NIGHT, at(7, 22), CANARY, Seen(at(7, 21), [(at(7, 21), True)]), at(7, 0))["outside"]


def test_slow_fires_when_the_last_hour_brought_fewer_files_than_asked() -> None:
    started = at(7, 12)
    few = [(at(7, 22) + i * 600, True) for i in range(5)]
    many = [(at(7, 22) + i * 300, True) for i in range(12)]
    assert alarms(NIGHT, at(7, 23), CANARY, Seen(few[-1][0], few), started)["slow"]
    assert not alarms(NIGHT, at(7, 23), CANARY, Seen(many[-1][0], many), started)["slow"]
    # not in the window's first hour, nor with the alarm off
    assert not alarms(NIGHT, at(7, 20, 40), CANARY, Seen(at(7, 20, 39), [(at(7, 20, 39), True)]), started)["slow"]
    off = Expected(spans=NIGHT.spans, quiet_minutes=30, min_files_per_hour=0)
    assert not alarms(off, at(7, 23), CANARY, Seen(few[-1][0], few), started)["slow"]


def test_next_change_is_the_window_edge() -> None:
    change = NIGHT.next_change(at(7, 12), CANARY, step=60)
    assert change is not None and abs(change - at(7, 20)) <= 60
