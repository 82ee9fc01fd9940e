"""The Rucio server at the other end: which release it is, said once when the agent first reaches
it (and again if a site upgrades it under a running agent), with a warning for a release older
than any the agent is tested against.

The releases CI runs the Rucio tests against are named here and in scripts/lake/common.sh (a unit
test keeps the two equal): the newest Rucio release, and the newest release of the oldest
long-term-support series Rucio still maintains. The README says which and why.

The release number is for people only. What differs between series is found by asking the server
for it (see RucioClient), never by comparing release numbers: a site's build may carry backports,
and a number says nothing certain about a call's answer.
"""

from __future__ import annotations

import re
import threading

import structlog

log = structlog.get_logger("edge_agent.lake.rucio")

NEWEST_TESTED = "41.5.1"
OLDEST_TESTED = "38.6.4"

_RELEASE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")


def release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a Rucio version string ('38.6.4', '1.29.0.post1'); None when the
    server names none we can read (then no warning: nothing certain can be said)."""
    m = _RELEASE.match(version)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def older_than_tested(version: str) -> bool:
    """Is `version` a release before the oldest the agent is tested against?"""
    got, oldest = release(version), release(OLDEST_TESTED)
    return got is not None and oldest is not None and got < oldest


class ServerRelease:
    """The release a server last answered /ping with: logged the first time, and each release not
    seen before (an upgrade; behind a load balancer during a rolling upgrade, two releases take
    turns: each is said once, not at every turn)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.version: str | None = None
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, version: str) -> None:
        with self._lock:
            before, self.version = self.version, version
            if version in self._said:
                return
            self._said.add(version)
        tested = f"{OLDEST_TESTED} to {NEWEST_TESTED}"
        if older_than_tested(version):
            log.warning("Rucio server older than any release edge-agent is tested against; "
                        "calls may fail or answer differently", url=self.url, version=version, tested=tested)
        elif before is None:
            log.info("Rucio server", url=self.url, version=version, tested=tested)
        if before is not None:
            log.warning("Rucio server changed release", url=self.url, version=version, was=before, tested=tested)
