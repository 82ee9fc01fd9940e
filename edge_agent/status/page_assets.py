"""The status page's style and script, inlined into the page (no external assets: a control room
may have no internet, and the status server serves nothing but its few endpoints).

The script polls /status and rebuilds the view in place. It inserts data only as text
(textContent, attribute values), never as markup, so a hostile file name stays a name.
Elements that show a number carry data-k (what it is) and data-rule (or, in the fleet's
table, data-agent), so tests and scripts can read the page without depending on its layout.
"""

CSS = r"""
:root{--fg:#1b1f24;--mute:#6a737d;--bg:#fff;--card:#f6f8fa;--line:#d0d7de;--ok:#1a7f37;--warn:#9a6700;
--bad:#cf222e;--accent:#0969da}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--mute:#8d96a0;--bg:#0d1117;--card:#161b22;
--line:#30363d;--ok:#3fb950;--warn:#d29922;--bad:#f85149;--accent:#58a6ff}}
*{box-sizing:border-box}
body{margin:0 auto;max-width:64rem;padding:.75rem;font:16px/1.4 system-ui,sans-serif;color:var(--fg);
background:var(--bg);overflow-wrap:anywhere}
h1{font-size:1.2rem;margin:0 0 .5rem}h2{font-size:1.05rem;margin:1rem 0 .4rem}h3{font-size:1rem;margin:0}
small,.mute{color:var(--mute)}
.banner{padding:.6rem .8rem;border-radius:.4rem;font-weight:600;color:#fff;background:var(--ok)}
.banner.bad{background:var(--bad)}.banner ul{margin:.3rem 0 0;padding-left:1.2rem;font-weight:400}
.stale{color:var(--bad);font-weight:600}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(9rem,1fr));gap:.5rem;margin:.6rem 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:.4rem;padding:.5rem .6rem}
.card b{display:block;font-size:1.3rem}
.rule{background:var(--card);border:1px solid var(--line);border-radius:.4rem;padding:.6rem;margin:.6rem 0}
.states{display:grid;grid-template-columns:repeat(auto-fill,minmax(7.5rem,1fr));gap:.3rem;margin:.5rem 0}
.state{border:1px solid var(--line);border-radius:.3rem;padding:.2rem .4rem;font-size:.85rem}
.state.zero{opacity:.45}.state b{font-size:1rem}
.state.quarantined:not(.zero),.state.retry_wait:not(.zero){border-color:var(--bad)}
.bar{position:relative;height:1rem;background:var(--bg);border:1px solid var(--line);border-radius:.3rem;
overflow:hidden}
.bar .fill{height:100%;background:var(--ok)}.bar .fill.warning{background:var(--warn)}
.bar .fill.critical{background:var(--bad)}
.bar .mark{position:absolute;top:0;bottom:0;width:2px;background:var(--warn)}.bar .mark.critical{background:var(--bad)}
svg.spark{display:block;width:100%;height:3rem;background:var(--bg);border:1px solid var(--line);border-radius:.3rem}
svg.spark polyline{fill:none;stroke:var(--accent);stroke-width:1.5;vector-effect:non-scaling-stroke}
svg.spark polyline.backlog{stroke:var(--warn)}
.warning{color:var(--warn)}.critical,.bad{color:var(--bad)}
ul.list{padding-left:1.1rem;margin:.2rem 0}ul.list li{margin:.15rem 0}
code{font-size:.9em}
footer{margin-top:1rem;font-size:.85rem}footer a{color:var(--accent)}
table{border-collapse:collapse}.z{opacity:.45}td,th{border:1px solid var(--line);padding:2px 5px;text-align:right}
"""

SCRIPT = r"""
"use strict";
(function () {
  const EVERY_MS = 5000;      // at least; a /status that takes long to build is asked for less often
  let nextMs = EVERY_MS;
  const STATES = ["discovered", "complete", "hashed", "registered", "transferred", "confirmed", "deleted",
                  "retry_wait", "quarantined", "superseded"];
  let lastOk = null;

  // el("p", {class: "x", "data-k": "y"}, "text", child, ...): data only ever becomes text or attributes
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    for (const c of kids) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }
  function dur(s) {
    if (s === null || s === undefined) return "-";
    s = Math.max(0, Math.round(s));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function utc(ts) { return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"; }
  function num(k, rule, v) { return el("span", {"data-k": k, "data-rule": rule}, v); }

  // values oldest first; null breaks the line (no sample then)
  function spark(values, cls, label) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    const n = values.length, max = Math.max(1, ...values.filter(v => v !== null));
    svg.setAttribute("viewBox", "0 0 " + Math.max(1, n - 1) + " 100");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "spark");
    svg.setAttribute("role", "img");
    const title = document.createElementNS(NS, "title");
    title.textContent = label;
    svg.append(title);
    let pts = [];
    const flush = () => {
      // a lone sample still shows: a short level line ending at it
      if (pts.length === 1) pts.unshift((parseFloat(pts[0]) - 0.6) + "," + pts[0].split(",")[1]);
      if (pts.length) {
        const line = document.createElementNS(NS, "polyline");
        line.setAttribute("points", pts.join(" "));
        if (cls) line.setAttribute("class", cls);
        svg.append(line);
      }
      pts = [];
    };
    values.forEach((v, i) => {
      if (v === null) { flush(); return; }
      pts.push(i + "," + (98 - 96 * v / max).toFixed(2));
    });
    flush();
    return svg;
  }

  function banner(doc) {
    const why = doc.not_ready_because || [];
    const b = el("div", {class: "banner" + (doc.ready ? "" : " bad"), "data-k": "ready"},
                 doc.ready ? "READY" : "NOT READY", doc.dry_run ? " · DRY RUN" : null);
    if (why.length) b.append(el("ul", {"data-k": "not-ready-because"}, ...why.map(w => el("li", {}, w))));
    return b;
  }

  function summary(doc) {
    const rules = Object.values(doc.rules);
    const sum = f => rules.reduce((a, r) => a + f(r), 0);
    const lake = doc.lake || {};
    const card = (label, k, value, extra, cls) =>
      el("div", {class: "card"}, el("small", {}, label), el("b", {"data-k": k, class: cls}, value), extra);
    return el("div", {class: "cards"},
      card("backlog", "backlog-files", sum(r => r.backlog.files), el("small", {}, bytes(sum(r => r.backlog.bytes)))),
      card("sending now", "sent-rate", bytes(sum(r => (r.throughput || {}).sent_bytes_per_s_1m || 0)) + "/s",
           el("small", {}, "1 min average")),
      card("quarantined", "quarantined-files", sum(r => r.states.quarantined.files),
           el("small", {}, "need a human"), sum(r => r.states.quarantined.files) ? "bad" : null),
      card("attention", "attention-files", (doc.attention || []).length, el("small", {}, "held back"),
           (doc.attention || []).length ? "warning" : null),
      card("lake", "lake", lake.problem ? "DOWN" : "up", el("small", {}, lake.kind || ""),
           lake.problem ? "bad" : null),
      card("oldest unconfirmed", "oldest-age", doc.oldest_unconfirmed ? dur(doc.oldest_unconfirmed.age_s) : "none",
           doc.oldest_unconfirmed ? el("small", {}, doc.oldest_unconfirmed.path) : null));
  }

  function disk(name, d) {
    if (!d) return el("p", {class: "mute"}, "buffer disk: not sampled yet");
    const bar = el("div", {class: "bar", title: "used " + d.used_percent + "%"},
      el("div", {class: "fill " + d.level, style: "width:" + Math.min(100, d.used_percent) + "%"}),
      el("div", {class: "mark", style: "left:" + d.warn_percent + "%", title: "warning watermark"}),
      el("div", {class: "mark critical", style: "left:" + d.critical_percent + "%", title: "critical watermark"}));
    return el("div", {},
      el("p", {}, "buffer disk ", num("disk-used-percent", name, d.used_percent + "%"),
         el("span", {class: d.level, "data-k": "disk-level", "data-rule": name}, " " + d.level),
         el("small", {}, " of " + bytes(d.total_bytes) + ", free " + bytes(d.free_bytes) +
            " · watermarks " + d.warn_percent + "% / " + d.critical_percent + "%" +
            (d.hours_to_full !== null ? " · full in " + d.hours_to_full + " h" : ""))),
      bar);
  }

  function rule(name, r) {
    const t = r.throughput || {}, h = r.history;
    const states = el("div", {class: "states"}, ...STATES.map(s => {
      const c = r.states[s] || {files: 0, bytes: 0};
      return el("div", {class: "state " + s + (c.files ? "" : " zero")}, el("small", {}, s), el("br"),
                num("state-files", name, c.files), el("span", {class: "mute"}, c.files === 1 ? " file " : " files "),
                el("small", {"data-k": "state-bytes", "data-rule": name, "data-state": s}, bytes(c.bytes)));
    }));
    // data-state on the count too, so a reader finds "quarantined files of rule x" directly
    states.querySelectorAll('[data-k="state-files"]').forEach((e, i) => e.setAttribute("data-state", STATES[i]));
    const box = el("section", {class: "rule", "data-rule": name},
      el("h3", {}, name, el("small", {}, " " + r.directory + " → " + r.copies + " of " +
                                        (r.destinations || []).join(", "))),
      r.watch_problem ? el("p", {class: "warning"}, r.watch_problem) : null,
      el("p", {}, "backlog ", num("backlog-files", name, r.backlog.files),
         r.backlog.files === 1 ? " file, " : " files, ",
         num("backlog-bytes", name, bytes(r.backlog.bytes)),
         el("small", {}, " · sending " + bytes(t.sent_bytes_per_s_1m) + "/s (1 min), " +
                         bytes(t.sent_bytes_per_s_5m) + "/s (5 min) · hashing " +
                         bytes(t.hashed_bytes_per_s_1m) + "/s")),
      states);
    if (h) {
      const rate = h.sent_bytes.map(v => v === null ? null : v / h.bucket_s);
      const peak = Math.max(0, ...rate.filter(v => v !== null));
      box.append(el("p", {}, el("small", {}, "sent per minute, last hour (peak " + bytes(peak) + "/s)")),
                 spark(rate, null, "sent bytes per second, per minute, last hour"),
                 el("p", {}, el("small", {}, "backlog files, last hour")),
                 spark(h.backlog_files, "backlog", "backlog files, per minute, last hour"));
    }
    box.append(disk(name, r.disk));
    box.append(schedule(name, r.schedule));
    return box;
  }

  // the rule's observing schedule (rules.*.expected): expected now, the window, the alarms
  function schedule(name, s) {
    if (!s) return null;
    const on = Object.entries(s.alarms).filter(([, v]) => v).map(([k]) => k);
    return el("p", {"data-k": "schedule", "data-rule": name, class: on.length ? "bad" : null},
      el("small", {}, (s.expected ? "data expected now" : "no data expected now") + " (" + s.window + ")" +
         (s.next_change_at ? ", until " + utc(s.next_change_at) : "") + "; last new file " +
         (s.last_file_at ? utc(s.last_file_at) : "none") + ", " + s.files_last_hour + " in the last hour" +
         (on.length ? "; ALARM: " + on.join(", ") : "")));
  }

  // the agents of a shared ledger: one row each (data-agent), then each one's files in flight
  function fleet(f) {
    if (!f) return null;
    const head = el("tr", {}, ...["agent", "host", "version", "last heartbeat", "", "claims", "sent",
                                  "files/s", "steps"].map(h => el("th", {}, h)));
    const rows = f.agents.map(a => {
      const t = a.throughput || {}, id = a.agent_id;
      return el("tr", {"data-k": "fleet-agent", "data-agent": id, class: a.silent ? "bad" : null},
        el("th", {}, (a.this ? "* " : "") + id), el("td", {}, a.host || "-"), el("td", {}, a.version || "-"),
        el("td", {"data-k": "fleet-heartbeat-age", "data-agent": id},
           a.heartbeat_age_s === null ? "never" : dur(a.heartbeat_age_s) + " ago"),
        el("td", {"data-k": "fleet-alive", "data-agent": id}, a.silent ? "SILENT" : "alive"),
        el("td", {"data-k": "fleet-claims", "data-agent": id},
           a.claims + (a.expired_claims ? " (" + a.expired_claims + " expired)" : "")),
        el("td", {}, t.sent_bytes_per_s === undefined ? "-" : bytes(t.sent_bytes_per_s) + "/s"),
        el("td", {}, t.transferred_files_per_s === undefined ? "-" : t.transferred_files_per_s.toFixed(1)),
        el("td", {}, t.in_flight === undefined ? "-" : t.in_flight));
    });
    const box = el("section", {"data-k": "fleet"},
      el("h2", {}, "Fleet: " + f.agents.length + " agents (silent: no heartbeat for " + dur(f.silent_after_s) + ")"),
      el("div", {style: "overflow-x:auto"}, el("table", {}, head, ...rows)));
    for (const a of f.agents) {
      if (!a.claims) continue;
      const fl = a.in_flight;
      const lease = x => x.lease_left_s >= 0 ? "lease " + dur(x.lease_left_s) + " left"
                                             : "lease ran out " + dur(-x.lease_left_s) + " ago";
      box.append(
        el("p", {}, el("small", {}, "in flight under " + a.agent_id + ": " + a.claims + " (" +
           Object.entries(fl.by_state).map(([s, n]) => s + " " + n).join(", ") + ")")),
        el("ul", {class: "list", "data-k": "fleet-in-flight", "data-agent": a.agent_id},
           ...fl.files.map(x => el("li", {}, el("code", {}, "#" + x.file_id), " " + x.rule + ": " + x.path +
                                   " (" + x.state + ", " + bytes(x.size) + ", " + lease(x) + ")")),
           fl.more ? el("li", {class: "mute"}, "... and " + fl.more + " more") : null));
    }
    return box;
  }

  function list(title, k, items, fmt) {
    if (!items || !items.length) return null;
    return el("section", {},
      el("h2", {}, title + " (" + items.length + ")"),
      el("ul", {class: "list", "data-k": k}, ...items.slice(0, 50).map(a => el("li", {}, ...fmt(a)))));
  }

  function render(doc) {
    const a = doc.agent || {};
    document.getElementById("version").textContent = doc.version;
    const parts = [banner(doc), summary(doc)];
    if (doc.lake && doc.lake.problem) {
      parts.push(el("p", {class: "bad", "data-k": "lake-problem"}, "lake: " + doc.lake.problem));
    }
    for (const [name, r] of Object.entries(doc.rules)) parts.push(rule(name, r));
    parts.push(fleet(doc.fleet));
    parts.push(
      list("Quarantined: needs a human (edge-agent retry ID)", "quarantined", doc.quarantined,
           q => [el("code", {}, "#" + q.file_id), " " + q.rule + ": ", el("b", {}, q.path),
                 " (" + bytes(q.size) + "): " + (q.reason || "")]),
      list("Held back, needs attention", "attention", doc.attention,
           q => [el("code", {}, "#" + q.file_id),
                 " " + (q.did || q.path) + " (" + q.state + ", " + dur(q.since_s) + "): ", q.reason || ""]),
      list("Recent errors", "recent-errors", doc.recent_errors,
           e => [el("small", {}, utc(e.at)), " ", el("code", {}, "#" + e.file_id),
                 " " + e.rule + ": " + e.path + ": " + e.state + ": ", e.reason || ""]),
      list("Not handled (see edge-agent scan)", "notices", doc.notices,
           n => [n.rule + ": " + n.relpath + ": " + n.detail]),
      list("Nights (edge-agent nights)", "nights", doc.nights,
           n => [n.rule + ": ", el("b", {}, n.dataset), " ",
                 el("span", {class: n.overdue || n.verdict === "incomplete" ? "bad" : null, "data-k": "night-verdict"},
                    n.state === "closed" ? n.verdict : n.state + (n.overdue ? " OVERDUE" : "")),
                 n.files === null ? "" : " · " + n.files + " files",
                 n.closed_at ? " · closed " + utc(n.closed_at) : "",
                 n.reasons && n.reasons.length ? ": " + n.reasons.slice(0, 3).join("; ") : ""]));
    parts.push(el("p", {}, el("small", {}, "agent pid " + a.pid + " · up " + dur(a.uptime_s) + " · " + a.in_flight +
      " steps running" + (a.bandwidth_cap_bytes_per_s ? " · cap " + bytes(a.bandwidth_cap_bytes_per_s) + "/s" : ""))));
    document.getElementById("app").replaceChildren(...parts.filter(p => p));
  }

  function stamp() {
    const u = document.getElementById("updated");
    if (lastOk === null) return;
    const age = (Date.now() - lastOk) / 1000;
    const late = age > 3 * nextMs / 1000;
    u.className = late ? "stale" : "mute";
    u.textContent = (late ? "NO ANSWER from the agent for " + dur(age) + "; last " : "updated ") +
                    new Date(lastOk).toISOString().slice(11, 19) + " UTC";
  }

  function show(doc) {
    render(doc);
    lastOk = Date.now();
    document.body.setAttribute("data-updated", String(doc.generated_at));
    // keep an open tab under ~5% of one core of the agent's host, whatever the ledger's size
    nextMs = Math.min(60000, Math.max(EVERY_MS, 20000 * (doc.build_s || 0)));
    const st = document.getElementById("static");
    if (st) st.remove();
    stamp();
  }

  async function poll() {
    try {
      const r = await fetch("/status", {cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      show(await r.json());
    } catch (e) {
      stamp();
    }
    setTimeout(poll, nextMs);
  }

  show(JSON.parse(document.getElementById("initial").textContent));
  setTimeout(poll, nextMs);
  setInterval(stamp, 1000);
})();
"""
