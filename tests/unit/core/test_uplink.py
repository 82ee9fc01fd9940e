"""The fleet's one uplink (core/uplink.py): each agent's share of the cap from everyone's posts.
Pure: fixed cases, the invariants over random fleets, and a fleet simulated round by round."""

from __future__ import annotations

import math
import random

import pytest

from edge_agent.core.uplink import FLOOR, HEADROOM, Post, demand, fair_split, fresh_agents, next_share

CAP = 100e6          # 100 MB/s
STALE = 15.0
EPS = 1e-9


def post(agent: str, wants: bool = True, held: bool = True, rate: float = 0.0, share: float = 0.0,
         age_s: float = 0.0) -> Post:
    return Post(agent, wants, held, rate, share, age_s)


# ---------------------------------------------------------------- demand
def test_an_agent_without_transfers_asks_for_nothing() -> None:
    assert demand(post("a", wants=False, held=True, rate=50e6), CAP) == 0


def test_an_agent_its_share_held_back_asks_for_all_it_can_get() -> None:
    assert demand(post("a", held=True, rate=10e6), CAP) == math.inf


def test_an_agent_held_back_elsewhere_keeps_what_it_sends_plus_headroom() -> None:
    assert demand(post("a", held=False, rate=20e6), CAP) == pytest.approx(0.2 * (1 + HEADROOM))
    # ... and a little even when a large file's first seconds measured next to nothing
    assert demand(post("a", held=False, rate=0.0), CAP) == FLOOR
    assert demand(post("a", held=False, rate=math.nan), CAP) == FLOOR
    assert demand(post("a", held=False, rate=-5.0), CAP) == FLOOR


@pytest.mark.parametrize("cap", [math.inf, 0.0])
def test_no_cap_now_or_a_paused_window_says_nothing_of_a_rate(cap: float) -> None:
    # the rate measured under no cap (or none at all, paused) is no measure of what the agent asks
    assert demand(post("a", held=False, rate=1e6), cap) == math.inf
    assert demand(post("a", wants=False), cap) == 0


# ---------------------------------------------------------------- fair_split
@pytest.mark.parametrize(("demands", "parts"), [
    ({}, {}),
    ({"a": 0.1}, {"a": 1.0}),                                   # alone: the whole cap
    ({"a": math.inf, "b": math.inf}, {"a": 0.5, "b": 0.5}),
    ({"a": 0.1, "b": math.inf, "c": math.inf}, {"a": 0.1, "b": 0.45, "c": 0.45}),
    ({"a": 0.0, "b": math.inf}, {"a": 0.0, "b": 1.0}),          # an idle agent gives way
    ({"a": 0.1, "b": 0.2}, {"a": 0.45, "b": 0.55}),             # nobody wants the rest: split among all
    ({"a": 0.0, "b": 0.0}, {"a": 0.5, "b": 0.5}),
    ({"a": 0.3, "b": 0.6, "c": math.inf}, {"a": 0.3, "b": 0.35, "c": 0.35}),
])
def test_fair_split_is_max_min_fair(demands: dict[str, float], parts: dict[str, float]) -> None:
    got = fair_split(demands)
    assert got == pytest.approx(parts)


# ---------------------------------------------------------------- next_share
def test_an_agent_alone_has_the_whole_cap_as_today() -> None:
    for me in (post("a"), post("a", held=False, rate=1e6), post("a", wants=False)):
        assert next_share(me, [], CAP, STALE) == 1.0


def test_a_newcomer_takes_only_what_is_free_then_its_fair_part() -> None:
    old = post("old", share=1.0)                   # held the whole cap until now
    new = post("new")
    assert next_share(new, [old], CAP, STALE) == 0.0      # never the full cap, nor more than is free
    shrunk = next_share(old, [post("new", share=0.0)], CAP, STALE)
    assert shrunk == 0.5                           # the old agent makes room at its next round
    assert next_share(new, [post("old", share=shrunk)], CAP, STALE) == 0.5


def test_a_dead_agents_post_counts_for_nothing() -> None:
    dead = post("dead", share=0.5, age_s=STALE + 0.1)
    assert next_share(post("a"), [dead, post("b", share=0.0)], CAP, STALE) == 0.5
    assert next_share(post("a"), [dead], CAP, STALE) == 1.0
    assert fresh_agents("a", [dead, post("b"), post("a")], STALE) == 2
    # just fresh still counts
    assert next_share(post("a"), [post("b", share=0.5, age_s=STALE)], CAP, STALE) == 0.5


def test_an_agent_held_back_elsewhere_leaves_the_rest_to_one_that_wants_it() -> None:
    slow = post("slow", held=False, rate=10e6, share=0.5)
    fast = post("fast", share=0.5)
    assert next_share(slow, [fast], CAP, STALE) == pytest.approx(0.1 * (1 + HEADROOM))
    assert next_share(fast, [post("slow", held=False, rate=10e6, share=0.125)], CAP, STALE) == pytest.approx(0.875)


def test_a_broken_post_is_read_as_holding_the_whole_cap() -> None:
    assert next_share(post("a"), [post("b", share=math.nan)], CAP, STALE) == 0.0
    assert next_share(post("a"), [post("b", share=7.0)], CAP, STALE) == 0.0
    assert next_share(post("a"), [post("b", share=-1.0)], CAP, STALE) == 0.5


def test_float_dust_is_no_share() -> None:
    # a Throttle lets a whole chunk through at any rate above 0
    assert next_share(post("a"), [post("b", share=1 - 1e-12)], CAP, STALE) == 0.0


# ---------------------------------------------------------------- invariants over random fleets
def _random_fleet(rnd: random.Random) -> tuple[Post, list[Post], float]:
    n = rnd.randint(0, 8)
    raw = [rnd.random() for _ in range(n)]
    scale = rnd.choice([0.0, rnd.random(), 1.0]) / (sum(raw) or 1)
    others = [Post(f"o{i}", rnd.random() < 0.7, rnd.random() < 0.5, rnd.choice([0.0, rnd.random() * 2 * CAP]),
                   r * scale, rnd.choice([0.0, rnd.random() * 30])) for i, r in enumerate(raw)]
    me = Post("me", rnd.random() < 0.7, rnd.random() < 0.5, rnd.random() * 2 * CAP, rnd.random())
    cap = rnd.choice([CAP, 1e3, math.inf, 0.0])
    return me, others, cap


@pytest.mark.parametrize("seed", range(5))
def test_the_shares_never_add_up_to_more_than_the_cap(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(2000):
        me, others, cap = _random_fleet(rnd)
        mine = next_share(me, others, cap, STALE)
        fresh = [p for p in others if p.age_s <= STALE]
        assert 0.0 <= mine <= 1.0
        assert sum(p.share for p in fresh) + mine <= 1.0 + EPS
        demands = {p.agent: demand(p, cap) for p in [*fresh, me]}
        assert mine <= fair_split(demands)["me"] + EPS


@pytest.mark.parametrize("seed", range(5))
def test_fair_split_invariants(seed: int) -> None:
    """The parts add up to 1; nobody gets more than it asks unless everybody got what it asked; an
    agent that gets less than it asks gets at least as much as any other (max-min)."""
    rnd = random.Random(seed)
    for _ in range(2000):
        demands = {f"a{i}": rnd.choice([0.0, math.inf, rnd.random(), rnd.random() / 10])
                   for i in range(rnd.randint(1, 9))}
        parts = fair_split(demands)
        assert set(parts) == set(demands)
        assert sum(parts.values()) == pytest.approx(1.0)
        satisfied = all(parts[a] >= d - EPS for a, d in demands.items())
        for a, d in demands.items():
            if not satisfied:
                assert parts[a] <= d + EPS
            if parts[a] < d - EPS:
                assert all(parts[a] >= p - EPS for p in parts.values())


# ---------------------------------------------------------------- a fleet, round by round
class Fleet:
    """Agents that take turns (as the ledger's write lock makes them): each sends as much as its share
    and its own limit (`can`, a fraction of the cap) allow, and posts what it saw."""

    def __init__(self, can: dict[str, float]) -> None:
        self.can = dict(can)
        self.posts: dict[str, Post] = {}
        self.age: dict[str, float] = {}

    def round(self, agent: str) -> float:
        old = self.posts.get(agent)
        share = old.share if old else 0.0
        can = self.can[agent]
        me = Post(agent, wants=can > 0, held=can > share, rate=min(share, can) * CAP, share=share)
        others = [Post(p.agent, p.wants, p.held, p.rate, p.share, self.age.get(p.agent, 0.0))
                  for p in self.posts.values() if p.agent != agent]
        new = next_share(me, others, CAP, STALE)
        self.posts[agent] = Post(agent, me.wants, me.held, me.rate, new)
        fresh = [p.share for p in self.posts.values() if self.age.get(p.agent, 0.0) <= STALE]
        assert sum(fresh) <= 1.0 + EPS, self.posts        # at every step, not only in the end
        return new

    def rounds(self, n: int, agents: list[str] | None = None) -> dict[str, float]:
        for _ in range(n):
            for a in agents or list(self.can):
                self.round(a)
        return {a: p.share for a, p in self.posts.items()}


def test_greedy_agents_converge_to_equal_shares_that_fill_the_cap() -> None:
    fleet = Fleet({"a": math.inf, "b": math.inf, "c": math.inf})
    shares = fleet.rounds(3)
    assert shares == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_an_agent_limited_elsewhere_keeps_what_it_uses_and_the_others_fill_the_cap() -> None:
    fleet = Fleet({"slow": 0.1, "fast": math.inf})
    shares = fleet.rounds(4)
    assert shares["slow"] == pytest.approx(0.1 * (1 + HEADROOM))
    assert shares["slow"] + shares["fast"] == pytest.approx(1.0)


def test_a_newcomer_starts_with_nothing_and_has_its_part_within_two_rounds() -> None:
    fleet = Fleet({"a": math.inf, "b": math.inf})
    fleet.rounds(3)
    fleet.can["c"] = math.inf
    assert fleet.round("c") == 0.0                     # all of the cap was the others'
    fleet.rounds(2, ["a", "b", "c"])
    assert {a: p.share for a, p in fleet.posts.items()} == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_a_dead_agents_share_goes_to_the_others() -> None:
    fleet = Fleet({"a": math.inf, "b": math.inf, "c": math.inf})
    fleet.rounds(3)
    fleet.age["c"] = STALE + 1                         # c stopped posting
    shares = fleet.rounds(2, ["a", "b"])
    assert (shares["a"], shares["b"]) == pytest.approx((0.5, 0.5))


def test_an_idle_agent_gives_way_and_gets_its_part_back_when_it_has_work() -> None:
    fleet = Fleet({"a": math.inf, "b": 0.0})
    assert fleet.rounds(3) == pytest.approx({"a": 1.0, "b": 0.0})
    fleet.can["b"] = math.inf
    assert fleet.rounds(2, ["b", "a"]) == pytest.approx({"a": 0.5, "b": 0.5})
