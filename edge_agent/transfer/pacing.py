"""A token bucket shared by all transfer workers: the bandwidth cap, with daily windows, this
agent's share of it when a fleet shares one uplink (edge_agent/uplink.py sets it), and this host's
own cap on top (the lower of the two wins)."""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable, Sequence

from ..core.policy import Window, bandwidth_cap


class Throttle:
    """A Pacer: blocks before each chunk so that bytes go out no faster than this agent's share
    (1.0 unless a fleet shares the uplink) of the cap of the bandwidth window in force (0: paused),
    nor faster than `host_mbps` (0: no cap of this host's own)."""
    def __init__(self, default_mbps: float, windows: Sequence[Window],
                 clock: Callable[[], float] = time.monotonic,
                 local_time: Callable[[], dt.time] = lambda: dt.datetime.now().time(),
                 sleep: Callable[[float], None] = time.sleep, host_mbps: float = 0.0) -> None:
        self._default = default_mbps
        self._windows = list(windows)
        self._host = host_mbps * 1e6 if host_mbps > 0 else math.inf
        self._clock, self._local_time, self._sleep = clock, local_time, sleep
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._last = clock()
        self._share = 1.0
        self._granted = 0      # bytes let through since usage() was last asked
        self._waited = 0.0     # seconds senders waited for the share meanwhile (summed over senders)

    def cap(self) -> float:
        """Bytes/s the cap in force allows the whole fleet now (inf = no cap, 0 = paused by a window)."""
        return bandwidth_cap(self._local_time(), self._default, self._windows)

    def rate(self) -> float:
        """Bytes/s this agent may send now: its share of the cap, or the host's cap if lower (inf = no
        cap, 0 = paused or no share)."""
        return min(self._shared(), self._host)

    def _shared(self) -> float:
        """Bytes/s of the cap in force this agent's share allows (inf = no cap)."""
        cap = self.cap()
        if math.isinf(cap):
            return cap       # no cap now: a share of it is no cap either (and inf * 0 is not a rate)
        with self._lock:
            return cap * self._share

    def set_share(self, fraction: float) -> None:
        """From now on this agent sends at most `fraction` (0..1) of the cap in force."""
        with self._lock:
            self._share = min(1.0, max(0.0, fraction))

    def share(self) -> float:
        """The fraction of the cap this agent sends at most (1.0: all of it)."""
        with self._lock:
            return self._share

    def usage(self) -> tuple[int, float]:
        """(bytes let through, seconds senders waited for the share) since the last call: what this
        agent sent and whether its share held it back. A wait that the host's cap imposes (lower than
        the share) is not counted: a bigger share would not send more."""
        with self._lock:
            out = (self._granted, self._waited)
            self._granted, self._waited = 0, 0.0
        return out

    def __call__(self, nbytes: int) -> None:
        """Block until `nbytes` may be sent."""
        while True:
            shared = self._shared()
            rate = min(shared, self._host)
            if math.isinf(rate):
                with self._lock:
                    self._granted += nbytes
                return
            with self._lock:
                now = self._clock()
                # at most one second of burst is kept
                self._tokens = min(max(rate, 1.0), self._tokens + (now - self._last) * rate)
                self._last = now
                if rate > 0 and (self._tokens >= nbytes or self._tokens >= rate):
                    self._tokens -= nbytes
                    self._granted += nbytes
                    return
                wait = max(0.001, 1.0 if rate == 0 else min(1.0, (min(nbytes, rate) - self._tokens) / rate))
                if shared <= self._host:
                    self._waited += wait
            self._sleep(wait)
