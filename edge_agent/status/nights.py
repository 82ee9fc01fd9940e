"""The nights as operators see them (`edge-agent nights`, /status, the page, the metrics): read from
the ledger's book of nights, each with whether it is overdue (core/nights.py), bounded in cost."""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog

from ..core import nights as core
from ..ledger import Ledger
from ..nightbook import CLOSED
from ..settings import Settings

log = structlog.get_logger("edge_agent.status")

# the nights /status and the page list (the newest); `edge-agent nights --limit` shows more
SHOWN = 20


def listed(settings: Settings, ledger: Ledger, now: float, limit: int = SHOWN,
           rule: str | None = None) -> list[dict[str, Any]]:
    """The newest `limit` nights (of `rule`), each with `overdue` and `late_of`. Empty where the
    ledger has no book of nights yet (one written by an older agent, read without changing it)."""
    try:
        rows = ledger.nights(limit, rule)
    except Exception as exc:  # noqa: BLE001 - an older ledger read-only: no nights table
        log.debug("no nights to list", error=str(exc))
        return []
    out = []
    for n in rows:
        cfg = settings.rules.get(n["rule"])
        deadline_s = (cfg.night_deadline_hours if cfg else 0.0) * 3600
        late = n["state"] != CLOSED and n.get("ends_at") is not None and core.is_overdue(n["ends_at"], deadline_s, now)
        out.append({"rule": n["rule"], "dataset": n["dataset"], "night": n["night"], "state": n["state"],
                    "verdict": n["verdict"], "reasons": n["reasons"], "files": n["files"], "bytes": n["bytes"],
                    "ends_at": n["ends_at"], "closed_at": n["closed_at"], "manifest": n["manifest"],
                    "late_of": n["late_of"], "overdue": late})
    return out


def summary(settings: Settings, ledger: Ledger, now: float) -> dict[str, dict[str, Any]]:
    """Per rule (zero for one without close_nights): nights open and overdue, closed by verdict, late files, the
    last closing (for the metrics: the whole book, grouped in the database)."""
    out = {name: {"open": 0, "overdue": 0, "complete": 0, "incomplete": 0, "late_files": 0, "last_closed": None}
           for name in settings.rules}
    try:
        rows = ledger.night_summary()
        unclosed = {name: ledger.unclosed_nights(name) for name in out}
    except Exception as exc:  # noqa: BLE001 - an older ledger read-only: no nights table
        log.debug("no nights to sum up", error=str(exc))
        return out
    for r in rows:
        s = out.get(r["rule"])
        if s is None:
            continue
        s["late_files"] += int(r["late_files"] or 0)
        if r["state"] == CLOSED:
            if r["verdict"] in (core.Verdict.COMPLETE, core.Verdict.INCOMPLETE):
                s[r["verdict"]] += int(r["nights"])
            if r["last_closed"] is not None:
                s["last_closed"] = max(s["last_closed"] or 0.0, float(r["last_closed"]))
        else:
            s["open"] += int(r["nights"])
    for name, rows_open in unclosed.items():
        deadline_s = settings.rules[name].night_deadline_hours * 3600
        out[name]["overdue"] = sum(1 for n in rows_open if n.get("ends_at") is not None
                                   and core.is_overdue(n["ends_at"], deadline_s, now))
    return out


def render(nights: list[dict[str, Any]]) -> str:
    """The nights as lines for a terminal."""
    if not nights:
        return "no nights recorded (no rule closes nights, or none has a file yet)"
    lines = []
    for n in nights:
        when = dt.datetime.fromtimestamp(n["closed_at"], dt.UTC).strftime("%Y-%m-%d %H:%M") \
            if n["closed_at"] else ""
        word = n["verdict"] if n["state"] == CLOSED else n["state"] + (" OVERDUE" if n["overdue"] else "")
        late = f" (late files of {n['late_of']})" if n["late_of"] else ""
        lines.append(f"{n['rule']:<12} {n['dataset']:<32} {word:<14} {n['files'] if n['files'] is not None else '-':>6} "
                     f"files  {when}{late}")
        lines += [f"    - {r}" for r in n["reasons"][:20]]
        if len(n["reasons"]) > 20:
            lines.append(f"    ... and {len(n['reasons']) - 20} more (--json lists all)")
    return "\n".join(lines)
