"""A token bucket shared by all transfer workers: the bandwidth cap, with daily windows."""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable, Sequence

from ..core.policy import Window, bandwidth_cap


class Throttle:
    """A Pacer: blocks before each chunk so that bytes go out no faster than the cap of the
    bandwidth window in force (0: paused)."""
    def __init__(self, default_mbps: float, windows: Sequence[Window],
                 clock: Callable[[], float] = time.monotonic,
                 local_time: Callable[[], dt.time] = lambda: dt.datetime.now().time(),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._default = default_mbps
        self._windows = list(windows)
        self._clock, self._local_time, self._sleep = clock, local_time, sleep
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._last = clock()

    def rate(self) -> float:
        """Bytes/s allowed now (inf = no cap, 0 = paused by a window)."""
        return bandwidth_cap(self._local_time(), self._default, self._windows)

    def __call__(self, nbytes: int) -> None:
        """Block until `nbytes` may be sent."""
        while True:
            rate = self.rate()
            if math.isinf(rate):
                return
            with self._lock:
                now = self._clock()
                # at most one second of burst is kept
                self._tokens = min(max(rate, 1.0), self._tokens + (now - self._last) * rate)
                self._last = now
                if rate > 0 and (self._tokens >= nbytes or self._tokens >= rate):
                    self._tokens -= nbytes
                    return
                wait = 1.0 if rate == 0 else min(1.0, (min(nbytes, rate) - self._tokens) / rate)
            self._sleep(max(wait, 0.001))
