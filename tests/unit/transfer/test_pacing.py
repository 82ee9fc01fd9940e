"""The bandwidth Throttle with an injected clock, local time and sleep: no real time passes."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest

from edge_agent.core.policy import Window
from edge_agent.transfer.pacing import Throttle

MB = 1_000_000


class World:
    """One fake clock drives monotonic time, wall-clock local time and sleep."""

    def __init__(self, clock: Any, local_start: dt.datetime) -> None:
        self.clock = clock
        self.t0 = clock.now
        self.local_start = local_start

    def local_time(self) -> dt.time:
        return (self.local_start + dt.timedelta(seconds=self.clock.now - self.t0)).time()

    def throttle(self, mbps: float, windows: list[Window] | None = None) -> Throttle:
        return Throttle(mbps, windows or [], clock=self.clock, local_time=self.local_time, sleep=self.clock.sleep)


@pytest.fixture
def world(clock: Any) -> World:
    return World(clock, dt.datetime(2024, 3, 10, 12, 0, 0))


def test_unlimited_returns_at_once(world: World, clock: Any) -> None:
    th = world.throttle(0)
    assert th.rate() == math.inf
    for _ in range(100):
        th(64 * MB)
    assert clock.slept == []


@pytest.mark.parametrize(("mbps", "chunk", "chunks"), [(1, 100_000, 50), (10, 1 * MB, 30), (2.5, 8192, 400)])
def test_cap_makes_total_sleep_match_bytes_over_rate(world: World, clock: Any, mbps: float, chunk: int,
                                                     chunks: int) -> None:
    th = world.throttle(mbps)
    assert th.rate() == mbps * MB
    for _ in range(chunks):
        th(chunk)
    assert sum(clock.slept) == pytest.approx(chunk * chunks / (mbps * MB), rel=1e-6, abs=0.002)


def test_chunks_bigger_than_the_rate_are_paced_too(world: World, clock: Any) -> None:
    th = world.throttle(1)
    for _ in range(4):
        th(3 * MB)
    total = 12 * MB / MB
    # the last chunk goes out on credit: its time is paid by whoever sends next
    assert total - 3 - 0.01 <= sum(clock.slept) <= total + 0.01
    th(1)
    assert sum(clock.slept) == pytest.approx(total, abs=0.01)


def test_idle_time_allows_at_most_one_second_of_burst(world: World, clock: Any) -> None:
    th = world.throttle(1)
    clock.advance(3600)                 # idle for an hour
    for _ in range(10):
        th(MB // 2)                     # 5 MB: 1 MB may go at once, the rest at 1 MB/s
    assert sum(clock.slept) == pytest.approx(4.0, abs=0.01)


def test_a_paused_window_sleeps_until_it_ends(clock: Any) -> None:
    w = World(clock, dt.datetime(2024, 3, 10, 5, 59, 55, 500_000))
    night = Window(dt.time(20, 0), dt.time(6, 0), 0.0)   # crosses midnight, 0 = paused
    th = w.throttle(0, [night])
    assert th.rate() == 0
    th(MB)
    assert w.local_time() >= dt.time(6, 0)               # it did not return before the window ended
    assert sum(clock.slept) == pytest.approx(4.5, abs=1.01)
    assert max(clock.slept) <= 1.0                       # wakes up regularly to look at the window again
    assert len(clock.slept) <= 6                         # ... but does not spin while paused
    assert th.rate() == math.inf


def test_a_paused_window_then_the_default_cap(clock: Any) -> None:
    w = World(clock, dt.datetime(2024, 3, 10, 5, 59, 58))
    th = w.throttle(1, [Window(dt.time(20, 0), dt.time(6, 0), 0.0)])
    th(MB // 2)
    th(MB // 2)
    # ~2 s paused, then 1 MB at 1 MB/s
    assert sum(clock.slept) == pytest.approx(3.0, abs=1.01)
    assert w.local_time() >= dt.time(6, 0)


def test_window_cap_applies_inside_the_window(clock: Any) -> None:
    w = World(clock, dt.datetime(2024, 3, 10, 23, 0, 0))
    th = w.throttle(0, [Window(dt.time(22, 0), dt.time(2, 0), 2.0)])
    assert th.rate() == 2 * MB
    for _ in range(10):
        th(MB)
    assert sum(clock.slept) == pytest.approx(5.0, abs=0.01)


def test_rate_follows_local_time(clock: Any) -> None:
    w = World(clock, dt.datetime(2024, 3, 10, 8, 59, 59))
    th = w.throttle(0, [Window(dt.time(9, 0), dt.time(17, 0), 5.0)])
    assert th.rate() == math.inf
    clock.advance(1)
    assert th.rate() == 5 * MB
    clock.advance(8 * 3600)
    assert th.rate() == math.inf


# ---------------------------------------------------------------- a share of a fleet's cap (edge_agent/uplink.py)
def test_a_share_paces_at_that_fraction_of_the_cap(world: World, clock: Any) -> None:
    th = world.throttle(10)
    th.set_share(0.25)
    assert (th.share(), th.cap(), th.rate()) == (0.25, 10 * MB, 2.5 * MB)
    for _ in range(25):
        th(MB)
    assert sum(clock.slept) == pytest.approx(25 / 2.5, abs=1.01)


def test_a_share_follows_the_window_in_force(clock: Any) -> None:
    w = World(clock, dt.datetime(2024, 3, 10, 19, 59, 0))
    th = w.throttle(100, [Window(dt.time(20, 0), dt.time(6, 0), 10.0)])
    th.set_share(0.5)
    assert th.rate() == 50 * MB
    clock.advance(60)                    # the window's cap at once, without a new share
    assert th.rate() == 5 * MB


def test_a_share_of_no_cap_is_no_cap_and_a_share_of_nothing_waits(world: World, clock: Any) -> None:
    th = world.throttle(0)
    th.set_share(0.0)
    assert th.rate() == math.inf         # (not inf * 0)
    th(MB)
    assert clock.slept == []
    th = world.throttle(10)
    th.set_share(0.0)
    assert th.rate() == 0
    th.set_share(7.0)
    assert th.share() == 1.0             # a share is at most the whole cap


def test_usage_tells_what_was_sent_and_how_long_senders_waited(world: World, clock: Any) -> None:
    th = world.throttle(1)
    th.set_share(0.5)
    for _ in range(4):
        th(MB // 2)
    sent, waited = th.usage()
    assert sent == 2 * MB
    assert waited == pytest.approx(sum(clock.slept)) and waited == pytest.approx(3.5, abs=0.6)
    assert th.usage() == (0, 0.0)        # read and reset
    unlimited = world.throttle(0)
    unlimited(123)
    assert unlimited.usage() == (123, 0.0)


# ---------------------------------------------------------------- this host's own cap (host_bandwidth_mbps)
def host_throttle(world: World, mbps: float, host_mbps: float, windows: list[Window] | None = None) -> Throttle:
    return Throttle(mbps, windows or [], clock=world.clock, local_time=world.local_time, sleep=world.clock.sleep,
                    host_mbps=host_mbps)


def test_a_host_cap_alone_caps_the_agent(world: World, clock: Any) -> None:
    th = host_throttle(world, 0, 2)
    assert (th.cap(), th.rate()) == (math.inf, 2 * MB)     # no fleet cap: the host's is the agent's
    for _ in range(10):
        th(MB)
    assert sum(clock.slept) == pytest.approx(10 / 2, abs=1.01)


@pytest.mark.parametrize(("share", "host", "expected"), [(0.5, 2, 2 * MB), (0.1, 2, 1 * MB), (1.0, 0, 10 * MB)])
def test_the_lower_of_the_share_and_the_host_cap_wins(world: World, share: float, host: float,
                                                      expected: float) -> None:
    th = host_throttle(world, 10, host)
    th.set_share(share)
    assert th.rate() == expected
    assert th.cap() == 10 * MB                             # the fleet's cap is still the fleet's


def test_a_paused_window_pauses_a_host_capped_agent(clock: Any) -> None:
    w = World(clock, dt.datetime(2024, 3, 10, 23, 0, 0))
    th = host_throttle(w, 10, 5, [Window(dt.time(22, 0), dt.time(2, 0), 0.0)])
    assert th.rate() == 0


def test_waits_for_the_host_cap_are_not_waits_for_the_share(world: World, clock: Any) -> None:
    """The fleet's uplink share grows for an agent its share holds back: one held back by its own
    host would only take a share it cannot use."""
    th = host_throttle(world, 10, 1)
    th.set_share(0.5)                                      # 5 MB/s of the fleet's cap; the host allows 1
    for _ in range(4):
        th(MB)
    assert sum(clock.slept) == pytest.approx(4, abs=0.01)    # at the host's 1 MB/s
    assert th.usage() == (4 * MB, 0.0)
    th.set_share(0.05)                                     # 0.5 MB/s: now the share holds it back
    for _ in range(2):
        th(MB)
    sent, waited = th.usage()
    assert sent == 2 * MB and waited > 1
