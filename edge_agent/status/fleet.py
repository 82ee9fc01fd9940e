"""The fleet view read from a shared ledger (core/fleet.py shapes it), and a cache of that read for
the status server: /status, the page and /metrics may be asked for many times a second (open
pages poll, Prometheus scrapes); the ledger is read at most once every few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..core import fleet
from ..ledger import Ledger

# How long the status server reuses one read of the fleet. Heartbeats come every 30 s, so a view
# a few seconds old says the same; ages are computed afresh at each request all the same.
CACHE_S = 5.0


def read(ledger: Ledger, now: float, me: str | None = None,
         per_agent: int = fleet.FILES_PER_AGENT) -> dict[str, Any]:
    """The fleet as `ledger` records it at `now` (two reads: the agents and their claims)."""
    now = ledger.lease_clock(now)    # heartbeats and leases are in the ledger's clock
    agents, held = ledger.agents(), ledger.in_flight(now, per_agent)
    return fleet.view(agents, held, now, me)


class FleetCache:
    """The fleet view of a shared ledger, read at most once every `ttl_s`: requests that come
    meanwhile are answered from the last read, and requests that come together wait for one read
    rather than each making its own."""

    def __init__(self, ledger: Ledger, me: str | None, ttl_s: float = CACHE_S,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ledger, self.me, self.ttl_s = ledger, me, ttl_s
        self.clock, self.monotonic = clock, monotonic
        self.reads = 0     # how often the ledger was read (the tests count them)
        self._lock = threading.Lock()
        self._raw: tuple[float, list[dict[str, Any]], dict[str, dict[str, Any]]] | None = None
        self._offset = 0.0     # the ledger's clock (heartbeats, leases) less this host's, at the last read

    def get(self) -> dict[str, Any]:
        """The fleet view now: from a read at most `ttl_s` old, with the heartbeat ages and leases
        left computed for now."""
        with self._lock:
            if self._raw is None or self.monotonic() - self._raw[0] >= self.ttl_s:
                # the leases' expiry is judged at the time of the read, as the ledger saw them
                here = self.clock()
                self._offset = self.ledger.lease_clock(here) - here
                self._raw = (self.monotonic(), self.ledger.agents(),
                             self.ledger.in_flight(here + self._offset, fleet.FILES_PER_AGENT))
                self.reads += 1
            _, agents, held = self._raw
        return fleet.view(agents, held, self.clock() + self._offset, self.me)
