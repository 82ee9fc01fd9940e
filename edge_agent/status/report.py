"""The status document: what /status serves and `edge-agent status` prints.

Built from the ledger (which survives restarts) plus the runner's in-memory gauges.
`from_ledger` builds the part that needs no running daemon, so `edge-agent status`
can still answer at 3 a.m. when the daemon is down.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.lifecycle import BACKLOG, State
from ..ledger import Ledger
from ..settings import Settings
from . import nights

if TYPE_CHECKING:
    from ..runner import Runner
    from .fleet import FleetCache

STATE_ORDER = [s.value for s in (State.DISCOVERED, State.COMPLETE, State.HASHED, State.REGISTERED, State.COPIED,
                                 State.TRANSFERRED, State.CONFIRMED, State.DELETED, State.RETRY_WAIT,
                                 State.QUARANTINED, State.SUPERSEDED)]
HEALTH_STALL_S = 60.0


def human_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and transfer rates are quoted)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def from_ledger(settings: Settings, ledger: Ledger, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    rules: dict[str, Any] = {}
    for name, rule in settings.rules.items():
        rules[name] = {"directory": str(rule.directory), "copies": rule.copies,
                       "destinations": rule.destinations, "delete": rule.delete.value,
                       "states": {s: {"files": 0, "bytes": 0} for s in STATE_ORDER}}
    for rule, state, files, nbytes in ledger.counts():
        if rule in rules:
            rules[rule]["states"][state] = {"files": files, "bytes": nbytes}
    for r in rules.values():
        backlog = [r["states"][s.value] for s in BACKLOG]
        r["backlog"] = {"files": sum(c["files"] for c in backlog), "bytes": sum(c["bytes"] for c in backlog)}
    oldest = ledger.oldest_unconfirmed()
    return {
        "version": __version__,
        "generated_at": now,
        "dry_run": settings.dry_run,
        "rules": rules,
        "oldest_unconfirmed": None if oldest is None else {
            "file_id": oldest.id, "rule": oldest.rule, "path": oldest.relpath, "state": oldest.state.value,
            "age_s": round(now - oldest.first_seen, 1), "reason": oldest.reason},
        # waiting on the lake with a warning: a stuck or overdue rule, a replica that went bad
        "attention": [{"file_id": r.id, "rule": r.rule, "path": r.relpath, "did": r.did, "state": r.state.value,
                       "lake_ref": r.lake_ref, "reason": r.reason, "since_s": round(now - r.updated_at, 1)}
                      for r in ledger.in_states([State.TRANSFERRED, State.CONFIRMED]) if r.reason][:50],
        # waiting for a human (`edge-agent retry`); never deleted
        "quarantined": [{"file_id": r.id, "rule": r.rule, "path": r.relpath, "size": r.size, "reason": r.reason,
                         "since_s": round(now - r.updated_at, 1)}
                        for r in ledger.recent(50, State.QUARANTINED)],
        "recent_errors": ledger.recent_errors(20),
        "notices": ledger.notices(50),
        # rules with close_nights: the newest nights, open or closed, with their verdicts
        "nights": nights.listed(settings, ledger, now),
    }


def readiness(runner: "Runner", now: float) -> list[str]:
    """Why the agent cannot make progress right now (empty: ready)."""
    why = []
    if runner.ledger_problem:
        why.append(f"ledger: {runner.ledger_problem}")
    if runner.lake_problem:
        why.append(f"lake: {runner.lake_problem}")
    if runner.last_tick and now - runner.last_tick > HEALTH_STALL_S:
        why.append(f"main loop stalled for {now - runner.last_tick:.0f}s")
    for rule, problem in runner.discovery.watch_problems.items():
        why.append(f"rules.{rule}: {problem}")
    for rule, d in runner.disks.items():
        if d.last and d.last.level == "critical":
            why.append(f"rules.{rule}: buffer disk {100 * d.last.used_fraction:.1f}% full (critical)")
    return why


def full(runner: "Runner", fleet: FleetCache | None = None) -> dict[str, Any]:
    """The whole /status document: from_ledger, the runner's gauges, and `fleet` (a shared ledger:
    every agent of it, core/fleet.view) when given."""
    now = time.time()
    t0 = time.perf_counter()
    doc = from_ledger(runner.settings, runner.ledger, now)
    rate = runner.throttle.rate()
    doc["agent"] = {"pid": os.getpid(), "started_at": runner.started_at,
                    "uptime_s": round(now - runner.started_at, 1),
                    "last_tick_age_s": round(now - runner.last_tick, 2) if runner.last_tick else None,
                    "in_flight": len(runner.in_flight),
                    "bandwidth_cap_bytes_per_s": None if math.isinf(rate) else rate,
                    # a fleet under one cap (a shared ledger): this agent's share of it (None: not shared)
                    "uplink": None if runner.uplink is None else runner.uplink.report()}
    why = readiness(runner, now)
    doc["ready"] = not why
    doc["not_ready_because"] = why
    doc["lake"] = {"kind": runner.settings.lake.kind, "problem": runner.lake_problem}
    schedules = runner.schedule.report() if runner.schedule is not None else {}
    for name, r in doc["rules"].items():
        r["throughput"] = {
            "sent_bytes_per_s_1m": round(runner.counters.sent[name].per_second(60)),
            "sent_bytes_per_s_5m": round(runner.counters.sent[name].per_second(300)),
            "hashed_bytes_per_s_1m": round(runner.counters.hashed[name].per_second(60)),
        }
        d = runner.disks[name].last
        r["disk"] = None if d is None else {
            "path": d.path, "total_bytes": d.total, "used_bytes": d.used, "free_bytes": d.free,
            "used_percent": round(100 * d.used_fraction, 2), "level": d.level,
            "warn_percent": runner.settings.rules[name].watermark_warn_percent,
            "critical_percent": runner.settings.rules[name].watermark_critical_percent,
            "fill_rate_bytes_per_s": None if d.fill_rate_bps is None else round(d.fill_rate_bps),
            "hours_to_full": None if d.seconds_to_full is None else round(d.seconds_to_full / 3600, 2)}
        r["watch_problem"] = runner.discovery.watch_problems.get(name)
        # the observing schedule (rules with `expected`): expected now, the alarms, the window
        r["schedule"] = schedules.get(name)
        r["history"] = history(runner, name)
    if fleet is not None:
        doc["fleet"] = fleet.get()
    # what this document cost; the page polls less often when it is dear (a very large ledger)
    doc["build_s"] = round(time.perf_counter() - t0, 4)
    return doc


def history(runner: "Runner", rule: str) -> dict[str, Any]:
    """The last hour per minute, oldest first; the last bucket is the minute still running.
    Minutes before the agent started, and backlog minutes without a sample, are null."""
    c = runner.counters
    step = c.sent_history[rule].bucket_s
    end, sent = c.sent_history[rule].snapshot()
    _, files = c.backlog_files_history[rule].snapshot(missing=None)
    _, nbytes = c.backlog_bytes_history[rule].snapshot(missing=None)
    # minutes that ended before this agent started are unknown, not idle
    started_bucket = runner.started_at // step * step
    first = max(0, len(sent) - 1 - int((end - started_bucket) // step))
    sent = [None if i < first else v for i, v in enumerate(sent)]
    return {"bucket_s": step, "last_bucket_start": end, "sent_bytes": sent, "backlog_files": files,
            "backlog_bytes": nbytes}
