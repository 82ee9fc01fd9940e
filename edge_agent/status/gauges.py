"""In-memory measurements the ledger does not keep: throughput and buffer fill rates."""

from __future__ import annotations

import collections
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..core import policy


class Rate:
    """Bytes per second over a sliding window, bucketed per second (bounded memory)."""

    def __init__(self, window_s: int = 300, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.deque[list[float]] = collections.deque()
        self.total = 0

    def add(self, n: int) -> None:
        now = int(self.clock())
        with self._lock:
            self.total += n
            if self._buckets and self._buckets[-1][0] == now:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([now, n])
            self._trim(now)

    def per_second(self, over_s: int = 60) -> float:
        now = int(self.clock())
        with self._lock:
            self._trim(now)
            return sum(n for t, n in self._buckets if t > now - over_s) / over_s

    def _trim(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._buckets.popleft()


@dataclass
class DiskReport:
    """One sample of a buffer disk: its use, how fast it fills, and the level that makes it."""
    path: str
    total: int
    used: int
    free: int
    used_fraction: float
    fill_rate_bps: float | None
    seconds_to_full: float | None
    level: str


class DiskWatch:
    """Samples a buffer's filesystem; forecasts time-to-full from the recent net fill rate."""

    def __init__(self, path: str, warn: float, critical: float, warn_eta_s: float,
                 window_s: float = 1800, clock: Callable[[], float] = time.time,
                 usage: Callable[[str], tuple[int, int, int]] = lambda p: tuple(shutil.disk_usage(p))) -> None:  # type: ignore[return-value]
        self.path, self.warn, self.critical, self.warn_eta_s = path, warn, critical, warn_eta_s
        self.window_s, self.clock, self.usage = window_s, clock, usage
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=2048)
        self.last: DiskReport | None = None

    def sample(self) -> DiskReport | None:
        try:
            total, used, free = self.usage(self.path)
        except OSError:
            return None
        now = self.clock()
        self._samples.append((now, used))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        rate = policy.fill_rate(list(self._samples))
        eta = policy.seconds_to_full(free, rate)
        frac = used / total if total else 0.0
        level = policy.disk_level(frac, self.warn, self.critical, eta, self.warn_eta_s)
        self.last = DiskReport(self.path, total, used, free, frac, rate, eta, level)
        return self.last


class Series:
    """A short per-minute history (the last hour by default) for the status page's curves.

    `add` sums into the current bucket (bytes sent); `put` overwrites it (a sampled level such as
    the backlog). Buckets nobody touched read as 0 for sums and None for levels, so a gap in the
    samples shows as a gap, not as an empty backlog."""

    def __init__(self, bucket_s: int = 60, buckets: int = 60, clock: Callable[[], float] = time.time) -> None:
        self.bucket_s, self.buckets, self.clock = bucket_s, buckets, clock
        self._lock = threading.Lock()
        self._values: dict[int, float] = {}

    def _now_bucket(self) -> int:
        return int(self.clock() // self.bucket_s)

    def add(self, n: float) -> None:
        b = self._now_bucket()
        with self._lock:
            self._values[b] = self._values.get(b, 0) + n
            self._trim(b)

    def put(self, v: float) -> None:
        b = self._now_bucket()
        with self._lock:
            self._values[b] = v
            self._trim(b)

    def snapshot(self, missing: float | None = 0) -> tuple[float, list[float | None]]:
        """(start of the newest bucket, values oldest first); the newest bucket is still filling."""
        b = self._now_bucket()
        with self._lock:
            self._trim(b)
            vals = [self._values.get(i, missing) for i in range(b - self.buckets + 1, b + 1)]
        return float(b * self.bucket_s), vals

    def _trim(self, newest: int) -> None:
        for k in [k for k in self._values if k <= newest - self.buckets]:
            del self._values[k]
