"""When data are expected, and the alarms of a rule's observing schedule.

A rule may say when its DAQ writes: hours of the day (in the rule's time zone, a span may cross
midnight), or the night as the sun defines it at the site (its altitude below -6, -12 or -18
degrees: civil, nautical or astronomical twilight over; astral computes it, an optional extra).
From that and what discovery saw, three alarms an operator wants at 3 a.m.:

  quiet    no new file for `quiet_minutes` while data are expected (a DAQ or a mount that died)
  outside  files arrived outside the expected time within the last hour (a clock, a wrong config,
           a DAQ left running)
  slow     fewer than `min_files_per_hour` files in the last hour, the expected time having run
           for at least an hour (a DAQ writing too slowly)

Pure: no I/O, no clocks; the caller passes the time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

# the sun's altitude below which each night begins (degrees; twilight names as astral uses them)
TWILIGHT = {"civil": 6.0, "nautical": 12.0, "astronomical": 18.0}
HOUR = 3600.0


@dataclass(frozen=True)
class Site:
    """Where the instrument is (degrees; metres above sea level)."""
    latitude: float
    longitude: float
    elevation_m: float = 0.0


@dataclass(frozen=True)
class Span:
    """A daily span of local time; end before start crosses midnight (20:00-06:00)."""
    start: dt.time
    end: dt.time

    def holds(self, t: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end


@dataclass(frozen=True)
class Expected:
    """A rule's expected times and the alarms' thresholds."""
    spans: tuple[Span, ...] = ()
    night: str | None = None              # a key of TWILIGHT: from the sun at `site`
    site: Site | None = None
    quiet_minutes: float = 30.0
    min_files_per_hour: float = 0.0       # 0: no "slow" alarm

    def expected(self, now: float, tz: dt.tzinfo) -> bool:
        """Are data expected at `now` (epoch seconds)?"""
        if self.night is not None:
            assert self.site is not None
            return sun_altitude(self.site, now) < -TWILIGHT[self.night]
        local = dt.datetime.fromtimestamp(now, tz).time()
        return any(s.holds(local) for s in self.spans)

    def expected_since(self, now: float, tz: dt.tzinfo, horizon: float, step: float = 60.0) -> float:
        """For how long (seconds, to within `step`, up to `horizon`) data have been expected
        without a break; 0 when they are not expected now."""
        if not self.expected(now, tz):
            return 0.0
        back = 0.0
        while back < horizon and self.expected(now - back - step, tz):
            back += step
        return back

    def next_change(self, now: float, tz: dt.tzinfo, step: float = 300.0, horizon: float = 36 * HOUR) -> float | None:
        """When (epoch seconds, to within `step`) the expectation changes next, for the page; None
        within `horizon` (polar day or night, or hours that cover the whole day)."""
        here = self.expected(now, tz)
        t = now + step
        while t <= now + horizon:
            if self.expected(t, tz) != here:
                return t
            t += step
        return None


def sun_altitude(site: Site, when: float) -> float:
    """The sun's altitude (degrees) seen from `site` at `when` (epoch seconds)."""
    from astral import Observer
    from astral.sun import elevation
    return float(elevation(Observer(site.latitude, site.longitude, site.elevation_m),
                           dt.datetime.fromtimestamp(when, dt.timezone.utc)))


@dataclass(frozen=True)
class Seen:
    """What discovery saw of a rule: when its last new file came (None: none since the ledger
    began), and when recent ones came (epoch seconds, the last hour or more) with whether data
    were expected at the time."""
    last_file_at: float | None
    arrivals: Sequence[tuple[float, bool]]


def alarms(spec: Expected, now: float, tz: dt.tzinfo, seen: Seen, started_at: float) -> dict[str, bool]:
    """Each alarm's state now. Quietness is counted from the latest of the last new file, the
    moment data became expected, and the agent's start (it cannot know what came before)."""
    quiet_s = spec.quiet_minutes * 60
    expected_for = spec.expected_since(now, tz, horizon=max(quiet_s, HOUR) + 60)
    quiet_from = max(seen.last_file_at or started_at, now - expected_for, started_at)
    quiet = expected_for > 0 and now - quiet_from >= quiet_s
    recent = [(at, exp) for at, exp in seen.arrivals if now - at <= HOUR]
    outside = any(not exp for _, exp in recent)
    slow = (spec.min_files_per_hour > 0 and expected_for >= HOUR and now - started_at >= HOUR
            and len(recent) < spec.min_files_per_hour)
    return {"quiet": quiet, "outside": outside, "slow": slow}
