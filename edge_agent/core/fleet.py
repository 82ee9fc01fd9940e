"""The fleet view, pure: what a heartbeat reports of an agent's own work, and how the agents of a
shared ledger are shown (alive or silent, their claims, their throughput, their files in flight).

The ledger holds the rows (an agent's heartbeat and figures, the files claimed under its name);
this module only turns them into the view that `edge-agent status --fleet`, `/status`, the page
and the metrics share, so that the four agree on what "silent" means.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# How often a running agent heartbeats into a shared ledger (the runner's job).
HEARTBEAT_S = 30.0
# An agent is silent once it missed this many heartbeats: one late heartbeat (a slow ledger, a
# busy host) is not a dead agent, three are worth showing.
SILENT_AFTER_HEARTBEATS = 3
SILENT_AFTER_S = SILENT_AFTER_HEARTBEATS * HEARTBEAT_S
# Files in flight listed per agent; the counts cover all of them (a fleet view of a million-row
# ledger stays a screenful).
FILES_PER_AGENT = 10


@dataclass(frozen=True)
class Totals:
    """What this agent has done since it started, at one time: its heartbeat reports the change
    between two of these (the runner's counters, which never go back)."""
    at: float
    sent_bytes: int = 0
    hashed_bytes: int = 0
    files_transferred: int = 0    # moves into `transferred`: copies written and recorded in the lake
    files_deleted: int = 0        # moves into `deleted`: buffer space given back


def throughput(prev: Totals, cur: Totals, in_flight: int) -> dict[str, Any]:
    """The figures a heartbeat stores: rates over the interval since the previous heartbeat (not a
    sliding window: two heartbeats 30 s apart say what the agent did in those 30 s), the totals
    since the agent started, and the steps it runs now."""
    span = cur.at - prev.at

    def rate(a: int, b: int) -> float:
        # a clock stepped back, or two heartbeats in one instant: no rate rather than a wrong one
        return round((b - a) / span, 3) if span > 0 and b >= a else 0.0

    return {"interval_s": round(max(span, 0.0), 1),
            "sent_bytes_per_s": rate(prev.sent_bytes, cur.sent_bytes),
            "hashed_bytes_per_s": rate(prev.hashed_bytes, cur.hashed_bytes),
            "transferred_files_per_s": rate(prev.files_transferred, cur.files_transferred),
            "deleted_files_per_s": rate(prev.files_deleted, cur.files_deleted),
            "sent_bytes": cur.sent_bytes, "files_transferred": cur.files_transferred,
            "files_deleted": cur.files_deleted, "in_flight": in_flight}


def decode_stats(text: str | None) -> dict[str, Any]:
    """A heartbeat's stored figures; {} when there are none (an agent of an older version) or they
    cannot be read: the view shows the agent all the same."""
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def is_silent(age_s: float | None) -> bool:
    """No heartbeat for more than SILENT_AFTER_HEARTBEATS intervals (or none ever recorded)."""
    return age_s is None or age_s > SILENT_AFTER_S


def view(agents: Sequence[Mapping[str, Any]], held: Mapping[str, Mapping[str, Any]], now: float,
         me: str | None = None) -> dict[str, Any]:
    """The fleet as it is shown: one entry per agent, by id, from the ledger's `agents` rows (with
    their decoded `stats`) and its claims per holder (Ledger.in_flight). A holder without an agents
    row (its heartbeat never written) is shown too, silent: its files are in flight all the same.
    `me`: the agent asking, marked `this`."""
    rows = {a["agent_id"]: a for a in agents}
    out = []
    for agent_id in sorted(set(rows) | set(held)):
        a = rows.get(agent_id, {})
        h = held.get(agent_id, {})
        beat = a.get("heartbeat_at")
        age = None if beat is None else round(max(0.0, now - beat), 1)
        files = [{**f, "lease_left_s": round(f["claim_until"] - now, 1)} for f in h.get("files", ())]
        out.append({
            "agent_id": agent_id, "this": agent_id == me,
            "host": a.get("host"), "pid": a.get("pid"), "version": a.get("version"),
            "started_at": a.get("started_at"), "heartbeat_at": beat, "heartbeat_age_s": age,
            "silent": is_silent(age),
            "claims": int(h.get("claims", 0)), "expired_claims": int(h.get("expired", 0)),
            "throughput": dict(a.get("stats") or {}),
            "in_flight": {"by_state": dict(h.get("by_state", {})), "files": files,
                          "more": max(0, int(h.get("claims", 0)) - len(files))},
        })
    return {"heartbeat_s": HEARTBEAT_S, "silent_after_s": SILENT_AFTER_S, "agents": out}


def stranded(fleet: Mapping[str, Any]) -> list[str]:
    """The agents that are silent while files are claimed under their name (what the alert
    EdgeAgentFleetAgentSilent is about): their files wait for the leases to run out."""
    return [a["agent_id"] for a in fleet["agents"] if a["silent"] and a["claims"]]
