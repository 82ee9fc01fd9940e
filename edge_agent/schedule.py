"""The observing schedule's alarms of each rule, kept up to date from the ledger (core/schedule.py
decides; this reads what arrived and remembers it). New files are read from the ledger rather than
counted by this agent's discovery: agents sharing a ledger see one fleet's arrivals, and a restart
keeps the last hour's."""

from __future__ import annotations

import collections
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import structlog

from .core import schedule
from .ledger import Ledger
from .settings import Settings

log = structlog.get_logger("edge_agent.schedule")


class ScheduleWatch:
    """Per rule with `expected`: whether data are expected now, the alarms, the last new file."""

    def __init__(self, settings: Settings, ledger: Ledger, clock: Callable[[], float], started_at: float) -> None:
        self.ledger = ledger
        self.clock = clock
        self.started_at = started_at
        self.specs = {name: (r.expected.spec(settings.site), r.tz) for name, r in settings.rules.items()
                      if r.expected is not None}
        self._cursor: dict[str, int] = {}
        self._last: dict[str, float | None] = {}
        self._arrivals: dict[str, collections.deque[tuple[float, bool]]] = {
            name: collections.deque() for name in self.specs}
        self.outside_total: dict[str, int] = {name: 0 for name in self.specs}
        self.state: dict[str, dict[str, Any]] = {}
        self._mutex = threading.Lock()

    def sample(self) -> None:
        """Read what arrived since the last sample, and decide the alarms now."""
        now = self.clock()
        for name, (spec, tz) in self.specs.items():
            if name not in self._cursor:
                last = self.ledger.last_arrival(name)
                self._cursor[name] = 0
                self._last[name] = None if last is None else last[1]
                # the last hour's arrivals (a restart keeps them), counted as they were
                new = self.ledger.arrivals(name, 0, now - schedule.HOUR)
            else:
                new = self.ledger.arrivals(name, self._cursor[name], 0.0)
            arrivals = self._arrivals[name]
            for fid, at, written in reversed(new):
                # judged by when the file was written, not found: a restart finding the night's
                # files in the morning is no file "outside" the night
                expected_then = spec.expected(written, tz)
                arrivals.append((at, expected_then))
                if not expected_then and name in self.state:
                    self.outside_total[name] += 1
                self._cursor[name] = max(self._cursor[name], fid)
                self._last[name] = max(self._last[name] or at, at)
            while arrivals and now - arrivals[0][0] > schedule.HOUR:
                arrivals.popleft()
            seen = schedule.Seen(self._last[name], list(arrivals))
            alarms = schedule.alarms(spec, now, tz, seen, self.started_at)
            change = spec.next_change(now, tz)
            state = {"expected": spec.expected(now, tz), "alarms": alarms, "last_file_at": self._last[name],
                     "files_last_hour": len(arrivals), "next_change_at": change,
                     "window": describe(spec, tz), "quiet_minutes": spec.quiet_minutes,
                     "min_files_per_hour": spec.min_files_per_hour}
            with self._mutex:
                before = self.state.get(name, {}).get("alarms", {})
                self.state[name] = state
            for alarm, on in alarms.items():
                if on and not before.get(alarm):
                    log.warning("schedule alarm", rule=name, alarm=alarm, why=WHY[alarm],
                                files_last_hour=len(arrivals), last_file_at=_iso(self._last[name]))
                elif before.get(alarm) and not on:
                    log.info("schedule alarm over", rule=name, alarm=alarm)

    def report(self) -> dict[str, dict[str, Any]]:
        with self._mutex:
            return {k: dict(v) for k, v in self.state.items()}


WHY = {"quiet": "no new file while data are expected",
       "outside": "files arrived outside the expected time in the last hour",
       "slow": "fewer new files in the last hour than min_files_per_hour while data are expected"}


def describe(spec: schedule.Expected, tz: dt.tzinfo) -> str:
    """The expected time as the page shows it."""
    if spec.night is not None:
        return f"{spec.night} night at {spec.site.latitude:.3f}, {spec.site.longitude:.3f}" if spec.site else spec.night
    return ", ".join(f"{s.start:%H:%M}-{s.end:%H:%M}" for s in spec.spans) + f" ({tz})"


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")
