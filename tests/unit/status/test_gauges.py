"""Throughput and buffer-fill gauges with an injected clock and disk usage."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.status.gauges import DiskWatch, Rate


def test_rate_over_a_window(clock: Any) -> None:
    r = Rate(window_s=300, clock=clock)
    for _ in range(60):
        r.add(1000)
        clock.advance(1)
    assert r.total == 60_000
    assert r.per_second(60) == pytest.approx(1000 * 59 / 60)   # the current second has no bytes yet
    assert r.per_second(10) == pytest.approx(1000 * 9 / 10)


def test_rate_same_second_is_one_bucket(clock: Any) -> None:
    r = Rate(window_s=300, clock=clock)
    r.add(100)
    clock.advance(0.5)
    r.add(200)
    assert len(r._buckets) == 1
    assert r.per_second(1) == 300


def test_rate_forgets_old_buckets(clock: Any) -> None:
    r = Rate(window_s=10, clock=clock)
    r.add(5000)
    clock.advance(10)
    assert r.per_second(60) == 0
    assert r.total == 5000            # the total is forever
    for _ in range(100):
        r.add(1)
        clock.advance(1)
    assert len(r._buckets) <= 10      # bounded memory


class Disk:
    def __init__(self, total: int, used: int) -> None:
        self.total, self.used = total, used

    def __call__(self, path: str) -> tuple[int, int, int]:
        return self.total, self.used, self.total - self.used


def test_disk_watch_forecasts_time_to_full(clock: Any) -> None:
    disk = Disk(1_000_000, 100_000)
    w = DiskWatch("/daq", warn=0.8, critical=0.9, warn_eta_s=3 * 3600, clock=clock, usage=disk)
    first = w.sample()
    assert first is not None and first.fill_rate_bps is None and first.level == "ok"
    for _ in range(10):
        clock.advance(60)
        disk.used += 6000                # 100 B/s
        rep = w.sample()
    assert rep is not None and w.last is rep
    assert rep.fill_rate_bps == pytest.approx(100.0)
    assert rep.seconds_to_full == pytest.approx((1_000_000 - 160_000) / 100.0)
    assert rep.used_fraction == pytest.approx(0.16)
    assert rep.level == "warning"        # 16 % used, but full in 2.3 h: sooner than the 3 h warning


def test_disk_watch_levels(clock: Any) -> None:
    disk = Disk(1000, 500)
    w = DiskWatch("/daq", warn=0.8, critical=0.9, warn_eta_s=3600, clock=clock, usage=disk)
    assert w.sample().level == "ok"      # type: ignore[union-attr]
    clock.advance(10)
    disk.used = 850
    assert w.sample().level == "warning"  # type: ignore[union-attr]
    clock.advance(10)
    disk.used = 950
    assert w.sample().level == "critical"  # type: ignore[union-attr]


def test_disk_watch_draining_has_no_forecast(clock: Any) -> None:
    disk = Disk(1000, 500)
    w = DiskWatch("/daq", warn=0.8, critical=0.9, warn_eta_s=3600, clock=clock, usage=disk)
    w.sample()
    clock.advance(10)
    disk.used = 400
    rep = w.sample()
    assert rep is not None and rep.fill_rate_bps == pytest.approx(-10.0)
    assert rep.seconds_to_full is None and rep.level == "ok"


def test_disk_watch_only_uses_the_recent_window(clock: Any) -> None:
    disk = Disk(10_000, 0)
    w = DiskWatch("/daq", warn=0.8, critical=0.9, warn_eta_s=0, window_s=100, clock=clock, usage=disk)
    for _ in range(10):                  # fast growth long ago
        w.sample()
        clock.advance(10)
        disk.used += 100
    clock.advance(1000)
    for _ in range(5):                   # flat now
        w.sample()
        clock.advance(10)
    assert w.last is not None and w.last.fill_rate_bps == pytest.approx(0.0)


def test_disk_watch_unreadable_filesystem(clock: Any) -> None:
    def broken(path: str) -> tuple[int, int, int]:
        raise OSError("stale NFS handle")
    w = DiskWatch("/daq", warn=0.8, critical=0.9, warn_eta_s=3600, clock=clock, usage=broken)
    assert w.sample() is None and w.last is None


def test_disk_watch_real_filesystem(tmp_path: Any) -> None:
    rep = DiskWatch(str(tmp_path), warn=0.8, critical=0.99, warn_eta_s=0).sample()
    assert rep is not None and rep.total > 0 and 0 <= rep.used_fraction <= 1


def test_series_sums_per_minute_and_keeps_the_last_hour(clock: Any) -> None:
    from edge_agent.status.gauges import Series
    clock.now = 6000.0                       # a minute boundary, so the buckets are easy to name
    s = Series(bucket_s=60, buckets=60, clock=clock)
    s.add(100)
    clock.advance(30)
    s.add(50)                                # same minute: summed
    clock.advance(60)
    s.add(7)
    end, vals = s.snapshot()
    assert end == 6060.0 and len(vals) == 60
    assert vals[-2:] == [150, 7] and vals[:-2] == [0] * 58
    clock.advance(59 * 60)                   # the 150 minute leaves the window, the 7 is the oldest
    end, vals = s.snapshot()
    assert vals[0] == 7 and sum(v or 0 for v in vals) == 7
    clock.advance(60)
    assert sum(v or 0 for v in s.snapshot()[1]) == 0
    assert len(s._values) == 0               # bounded memory


def test_series_put_keeps_the_last_sample_and_marks_gaps(clock: Any) -> None:
    from edge_agent.status.gauges import Series
    clock.now = 6000.0
    s = Series(bucket_s=60, buckets=5, clock=clock)
    s.put(3)
    clock.advance(10)
    s.put(4)                                 # a level: the last sample of the minute wins
    clock.advance(120)                       # one minute without a sample
    s.put(9)
    assert s.snapshot(missing=None)[1] == [None, None, 4, None, 9]
