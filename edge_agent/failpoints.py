"""Crash points for the crash tests: `EDGE_AGENT_FAILPOINTS=after_put,after_rule` makes the process
die (as kill -9 would: no cleanup, no flush) the first time it passes one of them.

Inert unless that variable is set; read once at start. A crash test needs an exact instant
("between upload and registration") that a timed kill -9 can only hit by luck.
"""

from __future__ import annotations

import os

_ARMED = frozenset(p for p in os.environ.get("EDGE_AGENT_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    if name in _ARMED:
        os._exit(137)
