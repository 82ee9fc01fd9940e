"""How long this agent may still act on the files it claimed in a shared ledger.

The ledger fences commits: a step of an agent that stalled past its lease commits nothing over
the new holder's work. Effects outside the ledger (a copy written, the local file unlinked) cannot
be fenced there, so a step asks before each of them whether its claim is still firmly held:
the last claim or renewal that the ledger acknowledged, plus the lease, minus a third of the lease
as margin, has not passed on this process's monotonic clock. Reckoned from the moment the request
was *sent*, this is never later than the expiry the ledger recorded, whatever the hosts' wall
clocks say. Renewals run every third of the lease, so a healthy agent always has over two thirds
left; once two renewals in a row have failed (a third is all that is left: room for the effect
just started, and for the clocks' rates) the agent starts no more effects on that file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


class ClaimBook:
    """The deadlines of this agent's claims (monotonic seconds), by file id. Thread-safe."""

    def __init__(self, lease_s: float, monotonic: Callable[[], float]) -> None:
        self.lease_s = lease_s
        self.monotonic = monotonic
        self._until: dict[int, float] = {}
        self._mutex = threading.Lock()

    def held(self, file_ids: Iterable[int], asked_at: float) -> None:
        """The ledger acknowledged claims or renewals on `file_ids`, asked for at `asked_at`."""
        with self._mutex:
            for fid in file_ids:
                self._until[fid] = asked_at + self.lease_s

    def lost(self, file_ids: Iterable[int]) -> None:
        """Claims the ledger no longer gives this agent (another took them over), or given back."""
        with self._mutex:
            for fid in file_ids:
                self._until.pop(fid, None)

    def firm(self, file_id: int) -> bool:
        """May a step still start an effect outside the ledger for `file_id`?"""
        with self._mutex:
            until = self._until.get(file_id)
        return until is not None and self.monotonic() < until - self.lease_s / 3
