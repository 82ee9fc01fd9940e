"""The status page: the /status document as one HTML page for a browser in the control room.

One self-contained document. Its script (page_assets) draws the view from the /status document
embedded in the page, then polls /status and redraws in place. Without script, a
server-rendered table shows the same numbers and the page reloads itself every 30 s.
Everything shown is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from typing import Any

from .page_assets import CSS, SCRIPT
from .report import STATE_ORDER, human_bytes


def _json_for_script(doc: dict[str, Any]) -> str:
    """JSON that cannot end its <script> element early (no '<', '>' or '&' in the text)."""
    text = json.dumps(doc, default=str, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _t(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(doc: dict[str, Any]) -> str:
    e = html.escape
    return "\n".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        "<noscript><meta http-equiv=refresh content=30></noscript>",
        f"<title>edge-agent</title><style>{CSS}</style></head><body>",
        f"<header><h1>edge-agent <small id=version>{e(str(doc.get('version')))}</small></h1>"
        "<small id=updated data-k=updated class=mute></small></header>",
        "<main id=app></main>",
        f"<div id=static>{_static(doc)}</div>",
        "<footer><a href=/status>/status</a> &middot; <a href=/metrics>/metrics</a> &middot; "
        "<a href=/healthz>/healthz</a> &middot; <a href=/readyz>/readyz</a></footer>",
        f"<script id=initial type=application/json>{_json_for_script(doc)}</script>",
        f"<script>{SCRIPT}</script>",
        "</body></html>"])


def _static(doc: dict[str, Any]) -> str:
    """The first paint for a browser without script: the numbers as a plain table."""
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
        if r.get("schedule"):
            sc = r["schedule"]
            on = [k for k, v in sc["alarms"].items() if v]
            rows.append(f"<tr><td></td><td colspan={len(STATE_ORDER) + 2}><small>"
                        f"{'data expected now' if sc['expected'] else 'no data expected now'} ({e(sc['window'])})"
                        f"{'; ALARM: ' + e(', '.join(on)) if on else ''}</small></td></tr>")
    out = [
        f"<p class={'ok' if ready else 'bad'}><b>{e(head)}</b>" + (" &middot; DRY RUN" if doc.get("dry_run") else "")
        + f" &middot; {_t(doc['generated_at'])}</p>",
        "<div style=overflow-x:auto><table><tr><th>rule</th>" + "".join(f"<th>{s}</th>" for s in STATE_ORDER)
        + "<th>sent (1 min)</th><th>buffer disk</th></tr>" + "".join(rows) + "</table></div>",
    ]
    if doc.get("fleet"):
        out.append(_fleet(doc["fleet"]))
    o = doc.get("oldest_unconfirmed")
    if o:
        out.append(f"<p>Oldest unconfirmed: #{o['file_id']} {e(o['path'])} ({e(o['state'])}, "
                   f"{dt.timedelta(seconds=int(o['age_s']))} old){': ' + e(o['reason']) if o.get('reason') else ''}</p>")
    for title, key, fmt in (
            ("Quarantined: needs a human", "quarantined",
             lambda a: f"#{a['file_id']} {e(a['path'])}: {e(a['reason'] or '')}"),
            ("Held back, needs attention", "attention",
             lambda a: f"#{a['file_id']} {e(a['did'] or '')} ({e(a['state'])}): {e(a['reason'] or '')}"),
            ("Recent errors", "recent_errors",
             lambda a: f"{_t(a['at'])} #{a['file_id']} {e(a['path'])}: {e(a['state'])}: {e(a['reason'] or '')}"),
            ("Not handled (see `edge-agent scan`)", "notices",
             lambda a: f"{e(a['relpath'])}: {e(a['detail'])}"),
            ("Nights (`edge-agent nights`)", "nights",
             lambda a: f"{e(a['rule'])}: {e(a['dataset'])} "
                       f"{e(a['verdict'] if a['state'] == 'closed' else a['state'] + (' OVERDUE' if a['overdue'] else ''))}"
                       + "".join(f"; {e(r)}" for r in a["reasons"][:3]))):
        items = doc.get(key) or []
        if items:
            out.append(f"<h2>{title}</h2><ul>" + "".join(f"<li>{fmt(a)}</li>" for a in items[:20]) + "</ul>")
    return "\n".join(out)


def _fleet(fleet: dict[str, Any]) -> str:
    """The agents of a shared ledger, one row each; silent ones marked."""
    e = html.escape
    rows = []
    for a in fleet["agents"]:
        age = "never" if a["heartbeat_age_s"] is None else f"{dt.timedelta(seconds=int(a['heartbeat_age_s']))} ago"
        rate = a["throughput"].get("sent_bytes_per_s")
        rows.append(f"<tr{' class=bad' if a['silent'] else ''}><th>{'* ' if a['this'] else ''}{e(a['agent_id'])}</th>"
                    f"<td>{e(a['host'] or '-')}</td><td>{e(a['version'] or '-')}</td><td>{age}</td>"
                    f"<td>{'SILENT' if a['silent'] else 'alive'}</td><td>{a['claims']}</td>"
                    f"<td>{'-' if rate is None else human_bytes(rate) + '/s'}</td></tr>")
    return ("<h2>Fleet</h2><div style=overflow-x:auto><table><tr><th>agent</th><th>host</th><th>version</th>"
            "<th>last heartbeat</th><th></th><th>claims</th><th>sent</th></tr>" + "".join(rows) + "</table></div>")
