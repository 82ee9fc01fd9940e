"""One uplink for a fleet (issue 15): this agent's share of the bandwidth cap, worked out from what
every agent sharing the ledger last posted of its use. Pure: no I/O, no clock. The shell
(edge_agent/uplink.py) measures, reads and writes the posts, and hands the share to the Throttle.

Shares are fractions of the cap in force, not rates: a window that changes the cap changes every
agent's rate at the same moment, and shares that add up to at most 1 keep the fleet within any cap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# An agent held back by something else (its disk, its storage, its hashing) keeps what it sends and
# this much more: room to grow before its share holds it back and it asks for all it can get.
HEADROOM = 0.25
# ... and at least this fraction of the cap while it has transfers: over a few seconds of one large
# file the measured rate can be near 0.
FLOOR = 0.02


@dataclass(frozen=True)
class Post:
    """What one agent last posted of its use of the uplink."""
    agent: str
    wants: bool          # it had transfers running (or sent bytes) in its last round
    held: bool           # its share made it wait: it would have sent more
    rate: float          # bytes/s it sent over its last round
    share: float         # the fraction of the cap it applies since
    age_s: float = 0.0   # seconds since it was posted, on the ledger's clock


def demand(post: Post, cap: float) -> float:
    """The fraction of `cap` (bytes/s) the agent of `post` asks for: nothing without transfers; as
    much as it can get when its share held it back, or when the cap in force says nothing of its
    rate (no cap now, or paused); else what it sent plus HEADROOM, and at least FLOOR."""
    if not post.wants:
        return 0.0
    if post.held or not (0 < cap < math.inf):
        return math.inf
    rate = post.rate if post.rate >= 0 else 0.0      # (not >= 0: a NaN from a broken post)
    return max(FLOOR, rate / cap * (1 + HEADROOM))


def fair_split(demands: Mapping[str, float]) -> dict[str, float]:
    """The whole cap (1.0) split max-min fair: an agent asking for less than an equal part gets what
    it asks for, the rest is split equally among those that ask for more; what nobody asks for is
    then split equally among all (room for an idle agent to start). The parts add up to 1."""
    parts: dict[str, float] = {}
    left = 1.0
    asks = sorted(((d if d > 0 else 0.0, a) for a, d in demands.items()), key=lambda x: (x[0], x[1]))
    for i, (asked, agent) in enumerate(asks):
        part = min(asked, left / (len(asks) - i))
        parts[agent] = part
        left = max(0.0, left - part)
    if parts and left > 0:
        extra = left / len(parts)
        parts = {a: p + extra for a, p in parts.items()}
    return parts


def posted_share(post: Post) -> float:
    """The fraction of the cap `post`'s agent applies, read conservatively (garbage counts as all)."""
    s = post.share
    return 0.0 if s <= 0 else s if s < 1 else 1.0     # NaN fails both tests: 1.0


def next_share(me: Post, posts: Iterable[Post], cap: float, stale_after_s: float) -> float:
    """`me`'s share of the cap from now on: its part of fair_split over its own demand and those of
    the fresh posts of the others, but never more than the others' posted shares leave free, so the
    shares posted add up to at most 1 while they change (an agent whose demand grows takes what is
    free, and the rest once the others made room at their next round). A post older than
    `stale_after_s` (an agent dead, or cut off from the ledger) counts for nothing."""
    fresh = [p for p in posts if p.agent != me.agent and p.age_s <= stale_after_s]
    target = fair_split({**{p.agent: demand(p, cap) for p in fresh}, me.agent: demand(me, cap)})[me.agent]
    free = 1.0 - sum(posted_share(p) for p in fresh)
    # float dust is no share: the Throttle lets a whole chunk through on any rate above 0
    return max(0.0, min(target, free)) if free > 1e-9 else 0.0


def fresh_agents(me: str, posts: Iterable[Post], stale_after_s: float) -> int:
    """How many agents share the uplink now: `me` and the others whose posts are fresh."""
    return 1 + sum(1 for p in posts if p.agent != me and p.age_s <= stale_after_s)
