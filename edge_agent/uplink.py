"""This agent's share of the fleet's one uplink (issue 15): agents sharing a ledger under a
bandwidth cap hold the cap together, not each. Every ROUND_S the runner's `uplink` job measures
what this agent sent and whether its share held it back, posts that into the ledger and takes its
share of the cap from everyone's posts (core/uplink.py, in one ledger transaction); the Throttle
applies it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from .core.uplink import Post, fresh_agents, next_share
from .transfer.pacing import Throttle

log = structlog.get_logger("edge_agent.uplink")

# How often each agent posts and takes its share: a share that must shrink does so at the agent's
# next round, one that may grow within two (the others make room first).
ROUND_S = 3.0
# A post this old is a dead agent's (or one cut off from the ledger): its share is free again. Five
# rounds: a round that waited for a busy ledger is not a death.
STALE_S = 15.0
# The share held the agent back when its senders waited for this fraction of the round or more.
HELD_FRACTION = 0.05


class Board(Protocol):
    """Where the agents post their use of the uplink: the shared ledger (Ledger.share_uplink)."""

    def share_uplink(self, agent: str, decide: Callable[[list[Post]], Post]) -> Post:
        """The others' posts given to `decide`, and what it answers stored as `agent`'s, atomically."""


class UplinkShare:
    """This agent's part of the fleet's bandwidth cap, agreed through the shared ledger. Nothing is
    sent before the first round; while the ledger cannot be read the last share stays (never the
    whole cap on a guess)."""

    def __init__(self, agent: str, board: Board, throttle: Throttle, busy: Callable[[], bool],
                 monotonic: Callable[[], float] = time.monotonic, stale_after_s: float = STALE_S) -> None:
        self.agent = agent
        self.board = board
        self.throttle = throttle
        self.busy = busy                  # steps that may send running now
        self.monotonic = monotonic
        self.stale_after_s = stale_after_s
        self.agents = 1                   # agents sharing the uplink at the last round, this one included
        self.problem: str | None = None   # why the last round failed (the share is the one before)
        self._last = monotonic()
        throttle.set_share(0.0)           # the whole cap may be others' already

    def round(self) -> None:
        """This agent's use since the last round posted, and its share from now on taken from
        everyone's posts; the scheduler's `uplink` job."""
        now = self.monotonic()
        elapsed, self._last = now - self._last, now
        sent, waited = self.throttle.usage()
        cap = self.throttle.cap()
        # a sender waiting in the throttle wants to send, whatever it is busy with (a first copy is
        # written while hashing)
        me = Post(self.agent, wants=self.busy() or sent > 0 or waited > 0,
                  held=waited > 0 and waited >= HELD_FRACTION * elapsed,
                  rate=sent / elapsed if elapsed > 0 else 0.0, share=self.throttle.share())
        agents = self.agents

        def decide(others: list[Post]) -> Post:
            nonlocal agents
            agents = fresh_agents(self.agent, others, self.stale_after_s)
            return Post(me.agent, me.wants, me.held, me.rate, next_share(me, others, cap, self.stale_after_s))
        try:
            posted = self.board.share_uplink(self.agent, decide)
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            if self.problem is None:
                log.warning("cannot agree this agent's share of the uplink; keeping the last one",
                            share=round(self.throttle.share(), 3), error=str(exc))
            self.problem = str(exc)
            return
        self.throttle.set_share(posted.share)
        if self.problem is not None:
            log.info("uplink share agreed again", share=round(posted.share, 3))
            self.problem = None
        if agents != self.agents:
            # an agent joined, or one's posts went stale (dead, or cut off from the ledger)
            log.info("agents sharing the uplink", agents=agents, was=self.agents, share=round(posted.share, 3))
            self.agents = agents

    def report(self) -> dict[str, Any]:
        """What /status shows: the share (a fraction, and in bytes/s of the cap in force: None when
        there is no cap now), the cap, the agents sharing it and why the last round failed."""
        cap, share = self.throttle.cap(), self.throttle.share()
        finite = not math.isinf(cap)
        return {"share": round(share, 4), "share_bytes_per_s": round(cap * share) if finite else None,
                "cap_bytes_per_s": cap if finite else None, "agents": self.agents, "problem": self.problem}
