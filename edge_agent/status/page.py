"""The status page: the /status document as one HTML page for a browser in the control room.

Server-rendered, no script, refreshes itself; everything shown is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

from .report import STATE_ORDER, human_bytes




def _t(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(doc: dict[str, Any]) -> str:
    e = html.escape
    ready = doc.get("ready", True)
    head = ("READY" if ready else "NOT READY: " + "; ".join(doc.get("not_ready_because", [])))
    rows = []
    for name, r in doc["rules"].items():
        cells = "".join(
            f"<td>{r['states'][s]['files']}<br><small>{human_bytes(r['states'][s]['bytes'])}</small></td>"
            if r["states"][s]["files"] else "<td class=z>0</td>" for s in STATE_ORDER)
        t, d = r.get("throughput") or {}, r.get("disk")
        disk = "-" if not d else (f"<span class={e(d['level'])}>{d['used_percent']}%</span> of {human_bytes(d['total_bytes'])}"
                                  + (f", full in {d['hours_to_full']} h" if d["hours_to_full"] is not None else ""))
        rows.append(f"<tr><th>{e(name)}</th>{cells}<td>{human_bytes(t.get('sent_bytes_per_s_1m'))}/s</td><td>{disk}</td></tr>")
    out = [
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=10>",
        "<title>edge-agent</title><style>body{font:14px sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{text-align:left}.z{color:#bbb}"
        ".ok{color:green}.warning{color:#b60}.critical{color:#c00;font-weight:bold}h2{font-size:15px}"
        ".bad{color:#c00}</style></head><body>",
        f"<h1>edge-agent {e(str(doc.get('version')))}</h1>",
        f"<p class={'ok' if ready else 'bad'}><b>{e(head)}</b>" + (" &middot; DRY RUN" if doc.get("dry_run") else "")
        + f" &middot; {_t(doc['generated_at'])}</p>",
        "<table><tr><th>rule</th>" + "".join(f"<th>{s}</th>" for s in STATE_ORDER)
        + "<th>sent (1 min)</th><th>buffer disk</th></tr>" + "".join(rows) + "</table>",
    ]
    o = doc.get("oldest_unconfirmed")
    if o:
        out.append(f"<p>Oldest unconfirmed: #{o['file_id']} {e(o['path'])} ({e(o['state'])}, "
                   f"{dt.timedelta(seconds=int(o['age_s']))} old){': ' + e(o['reason']) if o.get('reason') else ''}</p>")
    for title, key, fmt in (
            ("Held back, needs attention", "attention",
             lambda a: f"#{a['file_id']} {e(a['did'] or '')} ({e(a['state'])}): {e(a['reason'] or '')}"),
            ("Recent errors", "recent_errors",
             lambda a: f"{_t(a['at'])} #{a['file_id']} {e(a['path'])}: {e(a['state'])}: {e(a['reason'] or '')}"),
            ("Not handled (see `edge-agent scan`)", "notices",
             lambda a: f"{e(a['relpath'])}: {e(a['detail'])}")):
        items = doc.get(key) or []
        if items:
            out.append(f"<h2>{title}</h2><ul>" + "".join(f"<li>{fmt(a)}</li>" for a in items[:20]) + "</ul>")
    out.append("<p><small><a href=/status>/status</a> &middot; <a href=/metrics>/metrics</a> &middot; "
               "<a href=/healthz>/healthz</a> &middot; <a href=/readyz>/readyz</a></small></p></body></html>")
    return "\n".join(out)
