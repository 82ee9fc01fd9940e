"""One uplink for a fleet (issue 15): the ledger's table of posts, this agent's round (measure, post,
take a share), two agents on one ledger sending through their Throttles on one fake clock, and the
runner's wiring. The ledger is SQLite here; tests/integration/test_uplink_postgres.py runs these
tests again on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from edge_agent.core.uplink import Post, next_share
from edge_agent.errors import LedgerUnwritable, ShuttingDown
from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.ledger import Ledger
from edge_agent.runner import Runner
from edge_agent.settings import Settings
from edge_agent.status import metrics, report
from edge_agent.transfer.pacing import Throttle
from edge_agent.uplink import HELD_FRACTION, ROUND_S, UplinkShare

from .ledgers import open_ledger

MB = 1_000_000
CHUNK = 256 * 1024


@pytest.fixture
def ledger_at(tmp_path: Path, clock: Any) -> Iterator[Callable[[], Ledger]]:
    """Opens another connection to the test's ledger (another agent's), closed afterwards."""
    opened: list[Ledger] = []

    def open_one() -> Ledger:
        opened.append(open_ledger(tmp_path / "state" / "ledger.sqlite", clock=clock))
        return opened[-1]
    yield open_one
    for led in opened:
        led.close()


def _age(led: Ledger, agent: str, seconds: float) -> None:
    """`agent`'s post made `seconds` older (as if it had stopped posting that long ago)."""
    with led._tx() as db:
        db.execute("UPDATE uplink SET at = at - ? WHERE agent_id = ?", (seconds, agent))


# ---------------------------------------------------------------- the ledger's table
def test_a_post_is_stored_and_read_by_the_others_with_its_age_on_the_databases_clock(
        ledger_at: Callable[[], Ledger]) -> None:
    a, b = ledger_at(), ledger_at()
    seen: list[list[Post]] = []

    def decide(agent: str, share: float) -> Callable[[list[Post]], Post]:
        def d(others: list[Post]) -> Post:
            seen.append(others)
            return Post(agent, True, False, 5e6, share)
        return d
    assert a.share_uplink("a", decide("a", 0.25)) == Post("a", True, False, 5e6, 0.25)
    assert seen.pop() == []
    b.share_uplink("b", decide("b", 0.5))
    (got,) = seen.pop()                                # b sees a's post, not its own
    assert (got.agent, got.wants, got.held, got.rate, got.share) == ("a", True, False, 5e6, 0.25)
    assert -1 < got.age_s < 5
    a.share_uplink("a", decide("a", 0.5))               # one row per agent: the post replaced
    assert [(p.agent, p.share) for p in a.uplink_posts()] == [("a", 0.5), ("b", 0.5)]
    _age(a, "b", 100)
    (old,) = [p for p in a.uplink_posts() if p.agent == "b"]
    assert 99 < old.age_s < 105


def test_a_round_that_fails_to_decide_stores_nothing(ledger_at: Callable[[], Ledger]) -> None:
    led = ledger_at()

    def broken(others: list[Post]) -> Post:
        raise ValueError("a bug")
    with pytest.raises(ValueError):
        led.share_uplink("a", broken)
    assert led.uplink_posts() == []


def test_a_ledger_of_an_older_agent_gains_the_uplink_table(ledger_at: Callable[[], Ledger]) -> None:
    led = ledger_at()
    with led._tx() as db:
        db.execute("DROP TABLE uplink")
    again = ledger_at()        # what the next start of a newer agent does
    again.share_uplink("a", lambda others: Post("a", False, False, 0.0, 1.0))
    assert [p.agent for p in again.uplink_posts()] == ["a"]


def test_agents_posting_at_once_never_post_more_than_the_cap(ledger_at: Callable[[], Ledger]) -> None:
    """Three agents (connections of their own) take rounds at once while their demand changes at
    random; a fourth reads the posts meanwhile: the shares stored never add up to more than 1."""
    import random
    agents = {f"a{i}": ledger_at() for i in range(3)}
    watcher = ledger_at()
    done = threading.Event()
    worst: list[float] = []
    failed: list[str] = []

    def agent(name: str, led: Ledger) -> None:
        rnd = random.Random(name)
        try:
            for _ in range(40):
                me = Post(name, rnd.random() < 0.7, rnd.random() < 0.6, rnd.random() * 10 * MB, 0.0)
                led.share_uplink(name, lambda others, me=me: Post(  # type: ignore[misc]
                    name, me.wants, me.held, me.rate, next_share(me, others, 10 * MB, 60.0)))
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            failed.append(repr(exc))

    def watch() -> None:
        while not done.is_set():
            worst.append(sum(p.share for p in watcher.uplink_posts()))
    threads = [threading.Thread(target=agent, args=item) for item in agents.items()]
    w = threading.Thread(target=watch)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    w.join(30)
    assert failed == []
    assert len(watcher.uplink_posts()) == 3 and worst
    assert max(worst) <= 1 + 1e-9


# ---------------------------------------------------------------- this agent's round
class Sender:
    """An agent's transfer workers, as far as its uplink share sees them: a Throttle on the test's
    clock (its waits move the clock, see World), and whether a step that sends is running."""

    def __init__(self, clock: Any, sleep: Callable[[float], None] | None = None, host_mbps: float = 0) -> None:
        self.busy = False
        self.throttle = Throttle(10, [], clock=clock, local_time=lambda: dt.time(12), sleep=sleep or clock.sleep,
                                 host_mbps=host_mbps)


def test_a_round_posts_what_was_sent_and_takes_the_share(ledger_at: Callable[[], Ledger], clock: Any) -> None:
    led = ledger_at()
    s = Sender(clock)
    up = UplinkShare("a1", led, s.throttle, busy=lambda: s.busy, monotonic=clock)
    assert s.throttle.share() == 0.0            # nothing is sent before the first round
    up.round()
    assert s.throttle.share() == 1.0            # alone: the whole cap, as without a fleet
    (p,) = led.uplink_posts()
    assert (p.agent, p.wants, p.held, p.rate, p.share) == ("a1", False, False, 0.0, 1.0)
    t0 = clock.now
    s.busy = True
    s.throttle.set_share(0.5)
    for _ in range(40):                          # 10.5 MB at 5 MB/s: the share holds it back
        s.throttle(CHUNK)
    assert 0 < clock.now - t0 < ROUND_S
    clock.advance(t0 + ROUND_S - clock.now)
    up.round()
    (p,) = led.uplink_posts()
    assert (p.wants, p.held) == (True, True)
    assert p.rate == pytest.approx(40 * CHUNK / ROUND_S)
    assert p.share == 1.0 and up.report()["share_bytes_per_s"] == 10 * MB


def test_a_round_without_waits_is_not_held_back(ledger_at: Callable[[], Ledger], clock: Any) -> None:
    led = ledger_at()
    s = Sender(clock)
    up = UplinkShare("a1", led, s.throttle, busy=lambda: True, monotonic=clock)
    up.round()
    clock.advance(ROUND_S)
    s.throttle(CHUNK)                                       # a little, within the burst
    up.round()
    (p,) = led.uplink_posts()
    assert (p.wants, p.held) == (True, False) and p.rate == pytest.approx(CHUNK / ROUND_S)


def test_a_round_held_back_by_the_host_cap_asks_only_for_what_it_sends(ledger_at: Callable[[], Ledger],
                                                                       clock: Any) -> None:
    """host_bandwidth_mbps below the share: the senders wait for the host, and a bigger share would
    not send more, so the post is not `held` and the agent's demand is its rate (core/uplink.demand)."""
    led = ledger_at()
    s = Sender(clock, host_mbps=2)
    up = UplinkShare("a1", led, s.throttle, busy=lambda: True, monotonic=clock)
    up.round()
    assert s.throttle.share() == 1.0 and s.throttle.rate() == 2 * MB
    t0 = clock.now
    for _ in range(20):                                 # 5.2 MB at the host's 2 MB/s
        s.throttle(CHUNK)
    assert sum(clock.slept) > 2
    clock.advance(max(0.0, t0 + ROUND_S - clock.now))
    up.round()
    (p,) = led.uplink_posts()
    assert (p.wants, p.held) == (True, False)
    assert p.rate == pytest.approx(2 * MB, rel=0.15)


def test_a_sender_waiting_for_its_share_wants_more_whatever_step_it_is_in(ledger_at: Callable[[], Ledger],
                                                                          clock: Any) -> None:
    """A first copy is written while hashing: a sender that waits in the throttle wants to send,
    even when no transfer step is counted as busy (else a share of 0 would stay 0)."""
    led = ledger_at()
    given_up = clock.now + ROUND_S

    def sleep(seconds: float) -> None:       # a worker that waits out the round, then is stopped
        clock.sleep(seconds)
        if clock.now >= given_up:
            raise ShuttingDown("stopping")
    s = Sender(clock, sleep=sleep)
    up = UplinkShare("a1", led, s.throttle, busy=lambda: False, monotonic=clock)
    led.share_uplink("a2", lambda others: Post("a2", True, True, 0.0, 1.0))    # holds the whole cap
    up.round()
    assert s.throttle.share() == 0.0
    with pytest.raises(ShuttingDown):
        s.throttle(CHUNK)
    assert sum(clock.slept) >= HELD_FRACTION * ROUND_S
    up.round()
    (p,) = [p for p in led.uplink_posts() if p.agent == "a1"]
    assert (p.wants, p.held, p.rate) == (True, True, 0.0)


def test_a_ledger_that_cannot_be_read_keeps_the_last_share(ledger_at: Callable[[], Ledger], clock: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    led = ledger_at()
    s = Sender(clock)
    up = UplinkShare("a1", led, s.throttle, busy=lambda: False, monotonic=clock)
    led.share_uplink("a2", lambda others: Post("a2", False, False, 0.0, 0.4))
    up.round()
    assert s.throttle.share() == pytest.approx(0.5)     # two idle agents: half each

    def down(*a: Any, **k: Any) -> Any:
        raise LedgerUnwritable("the ledger cannot be written: server closed the connection")
    monkeypatch.setattr(led, "share_uplink", down)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            clock.advance(ROUND_S)
            up.round()
    assert s.throttle.share() == pytest.approx(0.5)     # never the whole cap on a guess
    assert up.problem and up.report()["problem"] == up.problem
    assert [e["event"] for e in logs] == ["cannot agree this agent's share of the uplink; keeping the last one"]
    monkeypatch.undo()
    with structlog.testing.capture_logs() as logs:
        up.round()
    assert up.problem is None and "uplink share agreed again" in [e["event"] for e in logs]


# ---------------------------------------------------------------- two agents, one ledger, one clock
class World:
    """Agents whose Throttles wait on one fake clock: a wait moves the clock, and the rounds that
    came due meanwhile run (as the scheduler's thread would run them)."""

    def __init__(self, clock: Any, watcher: Ledger, stale_after_s: float) -> None:
        self.clock, self.watcher, self.stale_after_s = clock, watcher, stale_after_s
        self.agents: list[Agent] = []
        self.next_round = clock.now
        self.sums: list[float] = []     # the shares posted (fresh ones), added up after each round

    def sleep(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.rounds_due()

    def rounds_due(self) -> None:
        while self.clock.now >= self.next_round:
            self.next_round += ROUND_S
            for a in self.agents:
                if a.alive:
                    a.share.round()
            self.sums.append(sum(p.share for p in self.watcher.uplink_posts() if p.age_s <= self.stale_after_s))

    def run(self, seconds: float) -> None:
        """Every busy agent sends, chunk by chunk, for `seconds` of the clock."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.rounds_due()
            if not any(a.alive and a.sender.busy for a in self.agents):
                self.sleep(0.5)
            for a in self.agents:
                a.send()


class Agent:
    def __init__(self, name: str, led: Ledger, world: World, host_mbps: float = 0) -> None:
        self.sender = Sender(world.clock, sleep=world.sleep, host_mbps=host_mbps)
        self.share = UplinkShare(name, led, self.sender.throttle, busy=lambda: self.sender.busy,
                                 monotonic=world.clock, stale_after_s=world.stale_after_s)
        self.sent = 0
        self.alive = True
        self.chunk = CHUNK       # sent per turn: the agents take turns on one clock
        world.agents.append(self)

    def send(self) -> None:
        if self.alive and self.sender.busy:
            self.sender.throttle(self.chunk)
            self.sent += self.chunk


def test_two_agents_on_one_ledger_together_send_the_cap_and_no_more(ledger_at: Callable[[], Ledger],
                                                                     clock: Any) -> None:
    world = World(clock, ledger_at(), stale_after_s=2.0)
    a, b = Agent("a", ledger_at(), world), Agent("b", ledger_at(), world)
    a.sender.busy = True
    world.run(5 * ROUND_S)                               # b idle: a has the whole cap
    assert (a.share.report()["share"], b.share.report()["share"]) == (1.0, 0.0)
    b.sender.busy = True
    world.run(3 * ROUND_S)                               # b asks: the two converge ...
    assert (a.share.report()["share"], b.share.report()["share"]) == pytest.approx((0.5, 0.5))
    a.sent = b.sent = 0
    start = clock.now
    world.run(20 * ROUND_S)                              # ... and together send the cap, no more
    took = clock.now - start
    assert (a.sent + b.sent) / took == pytest.approx(10 * MB, rel=0.05)
    assert a.sent / took == pytest.approx(5 * MB, rel=0.1) and b.sent / took == pytest.approx(5 * MB, rel=0.1)
    assert max(world.sums) <= 1 + 1e-9
    # a dies: once its post is stale (on the database's clock), b takes the whole cap
    a.alive = False
    time.sleep(2.2)
    world.run(2 * ROUND_S)
    assert b.share.report()["share"] == 1.0 and b.share.agents == 1
    b.sent = 0
    start = clock.now
    world.run(10 * ROUND_S)
    assert b.sent / (clock.now - start) == pytest.approx(10 * MB, rel=0.05)


def test_an_agent_its_host_holds_back_leaves_the_rest_of_the_cap_to_the_others(ledger_at: Callable[[], Ledger],
                                                                                clock: Any) -> None:
    """host_bandwidth_mbps: a's host allows 2 MB/s of the fleet's 10. Its waits are the host's, not
    its share's: it asks for what it sends (and a quarter more), and b gets the rest."""
    world = World(clock, ledger_at(), stale_after_s=60.0)
    a, b = Agent("a", ledger_at(), world, host_mbps=2), Agent("b", ledger_at(), world)
    b.chunk = 4 * CHUNK                     # (turns on one clock: b's turn must carry its bigger rate)
    a.sender.busy = b.sender.busy = True
    world.run(10 * ROUND_S)
    assert a.share.report()["share"] == pytest.approx(0.25, abs=0.02)    # its 2 MB/s and a quarter more
    assert b.share.report()["share"] == pytest.approx(0.75, abs=0.02)    # the rest
    a.sent = b.sent = 0
    start = clock.now
    world.run(20 * ROUND_S)
    took = clock.now - start
    assert a.sent / took == pytest.approx(2 * MB, rel=0.05)
    assert b.sent / took == pytest.approx(7.5 * MB, rel=0.1)
    assert max(world.sums) <= 1 + 1e-9


# ---------------------------------------------------------------- the runner's wiring
def _runner(tmp_path: Path, clock: Any, settings_data: Callable[..., dict[str, Any]], **top: Any) -> Runner:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir(exist_ok=True)
    s = Settings(**settings_data(tmp_path, **top))
    return Runner(s, open_ledger(s.ledger_path, clock=clock), MemoryCatalogue({}), clock=clock)


def _scrape(r: Runner) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    body = metrics.render(metrics.registry_for(r)).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples
            if s.name.startswith("edge_agent_uplink")}


def _stop(r: Runner) -> None:
    r.stop()
    if r.scheduler.running:
        r.shutdown(grace_s=1)
    for pool in r.pools.values():
        pool.shutdown()
    r.ledger.close()


def test_a_shared_ledger_under_a_cap_runs_the_uplink_job(tmp_path: Path, clock: Any,
                                                        settings_data: Callable[..., dict[str, Any]]) -> None:
    r = _runner(tmp_path, clock, settings_data, bandwidth_mbps=10, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"})
    try:
        assert r.uplink is not None and r.throttle.share() == 0.0
        r.start()
        assert r.scheduler.get_job("uplink").trigger.interval.total_seconds() == ROUND_S
        assert [p.agent for p in r.ledger.uplink_posts()] == ["a1"]
        assert r.throttle.rate() == 10 * MB            # alone: the whole cap
        assert report.full(r)["agent"]["uplink"] == {"share": 1.0, "share_bytes_per_s": 10 * MB,
                                                      "cap_bytes_per_s": 10 * MB, "agents": 1, "problem": None}
        assert _scrape(r) == {"edge_agent_uplink_share_mbps": 10.0, "edge_agent_uplink_agents": 1.0}
        # another agent holds 60 %: this one's next round leaves it that
        r.ledger.share_uplink("a2", lambda others: Post("a2", False, False, 0.0, 0.6))
        r.uplink.round()
        assert r.throttle.rate() == pytest.approx(4 * MB)
        assert _scrape(r) == pytest.approx({"edge_agent_uplink_share_mbps": 4.0, "edge_agent_uplink_agents": 2.0})
    finally:
        _stop(r)


@pytest.mark.parametrize("top", [{"bandwidth_mbps": 10}, {"ledger": {"agent_id": "a1"}, "rule": {"completion": ["renamed"]}}])
def test_without_a_shared_ledger_or_a_cap_nothing_changes(tmp_path: Path, clock: Any, top: dict[str, Any],
                                                         settings_data: Callable[..., dict[str, Any]]) -> None:
    r = _runner(tmp_path, clock, settings_data, **top)
    try:
        r.start()
        assert r.uplink is None and r.scheduler.get_job("uplink") is None
        assert r.throttle.share() == 1.0
        assert r.throttle.rate() == (10 * MB if "bandwidth_mbps" in top else math.inf)
        assert r.ledger.uplink_posts() == []            # no extra ledger writes
        assert report.full(r)["agent"]["uplink"] is None and _scrape(r) == {}
    finally:
        _stop(r)


@pytest.mark.parametrize(("top", "expected"), [
    ({}, 3 * MB),                                              # no shared ledger: it simply caps the agent
    ({"bandwidth_mbps": 10}, 3 * MB),                          # ... under the agent's own cap too
    ({"bandwidth_mbps": 10, "ledger": {"agent_id": "a1"}, "rule": {"completion": ["renamed"]}}, 3 * MB),
    ({"bandwidth_mbps": 2, "ledger": {"agent_id": "a1"}, "rule": {"completion": ["renamed"]}}, 2 * MB)])
def test_a_host_cap_is_applied_on_top_of_the_share(tmp_path: Path, clock: Any, top: dict[str, Any], expected: float,
                                                   settings_data: Callable[..., dict[str, Any]]) -> None:
    r = _runner(tmp_path, clock, settings_data, host_bandwidth_mbps=3, **top)
    try:
        r.start()
        assert r.throttle.rate() == expected               # alone in its fleet: the whole cap, or the host's
        assert report.full(r)["agent"]["bandwidth_cap_bytes_per_s"] == expected
        assert (r.uplink is None) == ("ledger" not in top)   # the host's cap alone shares nothing
    finally:
        _stop(r)


def test_a_host_cap_is_not_negative(tmp_path: Path, settings_data: Callable[..., dict[str, Any]]) -> None:
    from pydantic import ValidationError
    (tmp_path / "daq").mkdir()
    with pytest.raises(ValidationError, match="host_bandwidth_mbps"):
        Settings(**settings_data(tmp_path, host_bandwidth_mbps=-1))


def test_a_window_alone_is_a_cap_and_shares_it(tmp_path: Path, clock: Any,
                                               settings_data: Callable[..., dict[str, Any]]) -> None:
    r = _runner(tmp_path, clock, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"},
                windows=[{"start": "20:00", "end": "06:00", "bandwidth_mbps": 5}])
    try:
        assert r.uplink is not None
    finally:
        _stop(r)


def test_a_worker_waiting_for_its_share_ends_when_the_agent_stops(tmp_path: Path, clock: Any,
                                                                  settings_data: Callable[..., dict[str, Any]]) -> None:
    """No round runs once the scheduler stopped: a worker waiting on a share of 0 would hold the
    process's exit for ever."""
    r = _runner(tmp_path, clock, settings_data, bandwidth_mbps=10, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"})
    got: list[BaseException] = []

    def send() -> None:
        try:
            r._pace(MB)
        except BaseException as exc:  # noqa: BLE001 - what the test looks for
            got.append(exc)
    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()                                 # share 0 before the first round: it waits
    r.stop()
    t.join(5)
    try:
        assert not t.is_alive() and len(got) == 1 and isinstance(got[0], ShuttingDown)
    finally:
        _stop(r)
