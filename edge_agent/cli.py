"""edge-agent: moves complete DAQ files into the data lake and frees the buffer once the lake
holds N verified copies. This is its command line: it parses, loads settings, wires the parts."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from . import __version__, logs
from .core.lifecycle import Event, State
from .errors import ConfigError, LedgerUnreachable, LedgerUnwritable
from .ledgerdb import database_errors
from .ledger import Ledger, StaleTransition
from .settings import Settings, load_settings, masked_dump

DEFAULT_CONFIG = "/etc/edge-agent/edge-agent.toml"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    p.add_argument("-c", "--config", default=os.environ.get("EDGE_AGENT_CONFIG"),
                   help=f"the observatory's TOML config (env EDGE_AGENT_CONFIG; default {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    cc = sub.add_parser("check-config", help="validate a config and print it, secrets masked")
    cc.add_argument("file", nargs="?", help="the config file (default: --config)")
    st = sub.add_parser("status", help="what the running agent reports (falls back to the ledger)")
    st.add_argument("--json", action="store_true", help="print the raw /status document")
    st.add_argument("--fleet", action="store_true", help="every agent of a shared ledger: heartbeat, claims, "
                    "throughput, files in flight (read from the ledger; exit 1 if a silent agent holds claims)")
    sc = sub.add_parser("scan", help="what would be picked up in the watched trees, and why not")
    sc.add_argument("--dry-run", action="store_true", default=True, help="(always: scan never changes anything)")
    fl = sub.add_parser("files", help="list files in the ledger, or show one file's history")
    fl.add_argument("file", nargs="?", help="a ledger id, or part of a path or DID name")
    fl.add_argument("--state", choices=[s.value for s in State], help="only files in this state")
    fl.add_argument("--limit", type=int, default=50)
    fl.add_argument("--json", action="store_true")
    cu = sub.add_parser("custody", help="what the ledger knows of a path's custody: every version, its DID, "
                        "checksums, replicas, confirmation and deletion (as GET /custody; exit 1: not known)")
    cu.add_argument("path", help="a file's path: absolute, relative to the current directory inside a watched "
                    "tree, or relative to a rule's directory")
    rt = sub.add_parser("retry", help="send quarantined files back to the step that failed")
    rt.add_argument("ids", nargs="*", type=int, help="ledger ids (see `edge-agent files --state quarantined`)")
    rt.add_argument("--all", action="store_true", help="every quarantined file")
    nt = sub.add_parser("nights", help="nights of rules with close_nights: open, closing or closed, with their "
                        "verdicts (exit 1 if one is overdue)")
    nt.add_argument("--rule", metavar="NAME", help="only this rule's nights")
    nt.add_argument("--limit", type=int, default=50)
    nt.add_argument("--json", action="store_true")
    sub.add_parser("adopt-ledger", help="make this host the owner of a ledger written on another host or "
                   "for another buffer (after checking it; the agent must be stopped)")
    audit_help = ("compare the ledger, the buffer and the lake (catalogue and storage), read-only; exit 0 all "
                  "well, 1 problems found, 2 no verdict (usage, config, the catalogue unreachable)")
    au = sub.add_parser("audit", help=audit_help, description=audit_help)
    au.add_argument("--dataset", metavar="SCOPE:NAME", help="only this dataset (what the lake holds in it too)")
    au.add_argument("--night", metavar="YYYY-MM-DD", help="only this observing night (as the rule's "
                    "night_rollover_hour and timezone name it)")
    au.add_argument("--rule", metavar="NAME", help="only this rule's files")
    au.add_argument("--deep", action="store_true", help="read every copy through and compute its adler32 "
                    "(default: ask the storage for its checksum)")
    au.add_argument("--json", action="store_true", help="print the report as JSON")
    au.add_argument("--workers", type=int, default=1, help="storages asked at once (default 1; 4 were no faster "
                    "on a 2-core host)")
    au.add_argument("-v", "--verbose", action="store_true", help="also list confirmed and in-flight files")
    dm = sub.add_parser("demo", help="run the agent on a synthetic night in a scratch directory")
    dm.add_argument("--dir", default=None, help="scratch directory (default: a new one under /tmp)")
    dm.add_argument("--files", type=int, default=12)
    dm.add_argument("--port", type=int, default=8787)

    args = p.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args.dir, args.files, args.port)
        if args.command == "check-config":
            return check_config(args.file or args.config or DEFAULT_CONFIG)
        settings = load_settings(args.config or DEFAULT_CONFIG)
        logs.setup(settings.log.level, settings.log.format)
        if args.command == "run":
            return run(settings)
        if args.command == "status":
            return status_fleet(settings, args.json) if args.fleet else status(settings, args.json)
        if args.command == "scan":
            return scan(settings)
        if args.command == "files":
            return files(settings, args.file, args.state, args.limit, args.json)
        if args.command == "custody":
            return custody(settings, args.path)
        if args.command == "retry":
            return retry(settings, args.ids, args.all)
        if args.command == "nights":
            return nights(settings, args.rule, args.limit, args.json)
        if args.command == "adopt-ledger":
            return adopt_ledger(settings)
        if args.command == "audit":
            return audit(settings, args)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except LedgerUnwritable as exc:
        # temporary (EX_TEMPFAIL): systemd starts it again; once there is room (or the ledger's
        # database answers) it resumes
        hint = ("bring the ledger's database back" if isinstance(exc, LedgerUnreachable)
                else "free space in the state directory")
        print(f"edge-agent: {exc}; {hint}", file=sys.stderr)
        return 75
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `edge-agent files | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1


def check_config(path: str) -> int:
    from . import places
    try:
        settings = load_settings(path)
        places.check(settings)   # what only the filesystem knows: bind mounts
        if settings.lake.kind == "rucio":
            from .app import root_backend
            root_backend(settings)   # what only this host's Python knows: can the XRootD bindings import
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    print(f"# {path}: valid; effective settings (environment applied, secrets masked)")
    print(json.dumps(masked_dump(settings), indent=2))
    return 0


def run(settings: Settings) -> int:
    from .app import Agent
    agent = Agent(settings)

    def on_signal(signum: int, _: Any) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


def adopt_ledger(settings: Settings) -> int:
    from . import identity
    from .app import _exclusive, claim_ledger
    if not _ledger_exists(settings):
        raise ConfigError(f"no ledger at {settings.ledger_path}: nothing to adopt")
    lock = _exclusive(settings.state_dir / "agent.lock")   # refuses while an agent runs on it
    try:
        ledger = _open_ledger(settings, readonly=False)
        try:
            diffs = claim_ledger(ledger, identity.current(settings, shared=settings.agent_id is not None), adopt=True)
        finally:
            ledger.close()
    finally:
        os.close(lock)
    if diffs:
        print(f"adopted {settings.ledger_shown}; it was written for:\n  " + "\n  ".join(diffs))
    else:
        print(f"{settings.ledger_shown} already belongs to this host; nothing to do")
    return 0


def _ledger_exists(settings: Settings) -> bool:
    """Is there a ledger to read (a PostgreSQL ledger is taken to exist: opening it tells)?"""
    return settings.ledger.url is not None or settings.ledger_path.exists()


def _open_ledger(settings: Settings, readonly: bool = True) -> Ledger:
    from .app import open_ledger
    if not _ledger_exists(settings):
        raise ConfigError(f"no ledger at {settings.ledger_path}: the agent has not run with this state_dir")
    try:
        return open_ledger(settings, readonly=readonly)
    except (*database_errors(), LedgerUnwritable) as exc:
        raise ConfigError(f"cannot open the ledger {settings.ledger_shown}: {exc}") from None


def status(settings: Settings, as_json: bool) -> int:
    from .status import report
    host = settings.status.host if settings.status.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{settings.status.port}/status"
    source = url
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        ledger = _open_ledger(settings)
        doc = report.from_ledger(settings, ledger)
        if settings.agent_id:
            doc["fleet"] = _read_fleet(settings, ledger)
        source = f"{settings.ledger_shown} (the agent does not answer at {url})"
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render_status(doc, source))
    return 0 if doc.get("ready", True) else 1


NOT_SHARED = "no fleet: this agent's ledger is not shared (no [ledger] url or ledger.agent_id)"


def status_fleet(settings: Settings, as_json: bool) -> int:
    """Every agent of the shared ledger, read from the ledger itself (it holds the fleet; no agent
    need answer). Exit 1 when a silent agent holds claims (its files wait for its leases)."""
    from .core.fleet import stranded
    if not settings.agent_id:
        if as_json:
            print("null")          # as `status --json | jq .fleet` says of a ledger not shared
        print(NOT_SHARED, file=sys.stderr if as_json else sys.stdout)
        return 0
    ledger = _open_ledger(settings)
    try:
        view = _read_fleet(settings, ledger)
    finally:
        ledger.close()
    print(json.dumps(view, indent=2) if as_json else render_fleet(view, settings.ledger_shown))
    return 1 if stranded(view) else 0


def _read_fleet(settings: Settings, ledger: Ledger) -> dict[str, Any]:
    from .status import fleet
    try:
        return fleet.read(ledger, time.time(), settings.agent_id)
    except database_errors() as exc:
        # a ledger no agent of this version has opened yet (no agents table, no claims columns)
        raise ConfigError(f"cannot read the fleet from the ledger {settings.ledger_shown}: {exc}") from None


def _ago(s: float | None) -> str:
    if s is None:
        return "never"
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def render_fleet(view: dict[str, Any], where: str) -> str:
    """The fleet as a table, one agent a line (this config's agent marked *), then each agent's
    files in flight (the first few of them, and how many more)."""
    from .status.report import human_bytes
    agents = view["agents"]
    silent = [a for a in agents if a["silent"]]
    out = [(f"fleet of {where}: {len(agents)} agent(s), {len(silent)} silent "
            f"(no heartbeat for more than {view['silent_after_s']:.0f} s)")]
    if not agents:
        return "\n".join(out + ["no agent has heartbeated into this ledger yet"])
    header = ["", "agent", "host", "version", "heartbeat", "", "claims", "sent/s", "files/s", "steps"]
    rows = [header]
    for a in agents:
        t = a["throughput"]
        claims = str(a["claims"]) + (f" ({a['expired_claims']} expired)" if a["expired_claims"] else "")
        rows.append(["*" if a["this"] else "", a["agent_id"], a["host"] or "-", a["version"] or "-",
                     _ago(a["heartbeat_age_s"]), "SILENT" if a["silent"] else "alive", claims,
                     human_bytes(t.get("sent_bytes_per_s")), "-" if "transferred_files_per_s" not in t
                     else f"{t['transferred_files_per_s']:.1f}", str(t.get("in_flight", "-"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for a in agents:
        f = a["in_flight"]
        if not a["claims"]:
            continue
        states = ", ".join(f"{st} {n}" for st, n in sorted(f["by_state"].items()))
        out.append(f"in flight under {a['agent_id']}: {a['claims']} ({states})")
        for x in f["files"]:
            lease = (f"lease {x['lease_left_s']:.0f} s left" if x["lease_left_s"] >= 0
                     else f"lease ran out {-x['lease_left_s']:.0f} s ago")
            out.append(f"  #{x['file_id']} {x['rule']}: {x['path']} ({x['state']}, {human_bytes(x['size'])}, {lease})")
        if f["more"]:
            out.append(f"  ... and {f['more']} more")
    return "\n".join(out)


def _age(s: float) -> str:
    return str(dt.timedelta(seconds=int(s)))


def render_status(doc: dict[str, Any], source: str) -> str:
    from .status.report import STATE_ORDER, human_bytes
    out = [f"edge-agent {doc.get('version')}  from {source}"]
    if "ready" in doc:
        out.append("READY" if doc["ready"] else "NOT READY: " + "; ".join(doc["not_ready_because"]))
    if doc.get("dry_run"):
        out.append("DRY RUN: nothing is deleted")
    cols = ["rule"] + STATE_ORDER
    rows = [cols]
    for name, r in doc["rules"].items():
        rows.append([name] + [f"{r['states'][s]['files']} ({human_bytes(r['states'][s]['bytes'])})"
                              if r["states"][s]["files"] else "0" for s in STATE_ORDER])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    out.append("")
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for name, r in doc["rules"].items():
        t, d = r.get("throughput"), r.get("disk")
        if t:
            out.append(f"{name}: sent {human_bytes(t['sent_bytes_per_s_1m'])}/s (1 min), "
                       f"{human_bytes(t['sent_bytes_per_s_5m'])}/s (5 min)")
        if d:
            eta = f", full in {d['hours_to_full']} h" if d["hours_to_full"] is not None else ""
            out.append(f"{name}: buffer {d['path']} {d['used_percent']}% used ({d['level']}; warn "
                       f"{d['warn_percent']}%, critical {d['critical_percent']}%){eta}")
    o = doc.get("oldest_unconfirmed")
    if o:
        out.append(f"oldest unconfirmed: #{o['file_id']} {o['path']} ({o['state']}, {_age(o['age_s'])} old)"
                   + (f": {o['reason']}" if o.get("reason") else ""))
    if doc.get("attention"):
        out.append("held back, needs attention:")
        for st in doc["attention"][:10]:
            out.append(f"  #{st['file_id']} {st['did']} ({st['state']}): {st['reason']}")
    if doc.get("recent_errors"):
        out.append("recent errors:")
        for e in doc["recent_errors"][:10]:
            when = dt.datetime.fromtimestamp(e["at"], dt.timezone.utc).strftime("%H:%M:%S")
            out.append(f"  {when} #{e['file_id']} {e['path']}: {e['state']}: {e['reason']}")
    if doc.get("notices"):
        out.append("not handled (see `edge-agent scan`):")
        for n in doc["notices"][:10]:
            out.append(f"  {n['relpath']}: {n['detail']}")
    if doc.get("fleet"):
        agents = doc["fleet"]["agents"]
        out.append(f"fleet: {len(agents)} agent(s), {sum(a['claims'] for a in agents)} file(s) in flight "
                   "(`edge-agent status --fleet`)")
        for a in agents:
            if a["silent"] and a["claims"]:
                out.append(f"  SILENT with {a['claims']} claim(s): {a['agent_id']} on {a['host'] or '?'}, "
                           f"last heartbeat {_ago(a['heartbeat_age_s'])}")
    return "\n".join(out)


def scan(settings: Settings) -> int:
    """Walk every rule's tree and say, per entry, what the agent would do and why."""
    from .watch.filters import RuleFilter
    from .watch.scanner import walk
    ledger = _open_ledger(settings) if _ledger_exists(settings) else None
    for name, rule in settings.rules.items():
        print(f"[{name}] {rule.directory}")
        if not rule.directory.is_dir():
            print("  (directory does not exist)")
            continue
        filt = RuleFilter(rule)
        for e in sorted(walk(os.fsencode(rule.directory), rule.recursive), key=lambda e: e.path):
            if e.problem:
                verdict = f"REPORTED: {e.problem}"
            elif (skip := filt(e.relpath)) is not None:
                verdict = f"skipped: {skip.reason}"
            else:
                rec = ledger.live(name, e.path) if ledger else None
                verdict = f"in ledger #{rec.id}: {rec.state.value}" if rec else "would be picked up"
                if rec and rec.reason:
                    verdict += f" ({rec.reason})"
            print(f"  {e.relpath}: {verdict}")
    return 0


def files(settings: Settings, needle: str | None, state: str | None, limit: int, as_json: bool) -> int:
    from .status.report import human_bytes
    ledger = _open_ledger(settings)
    if needle:
        recs = ledger.find(needle, limit)
        if not recs:
            print(f"no file matches {needle!r}", file=sys.stderr)
            return 1
        if len(recs) == 1 or needle.isdigit():
            rec = recs[0]
            doc = {**rec.to_json(), "history": ledger.history(rec.id), "replicas": ledger.replicas(rec.id)}
            if as_json:
                print(json.dumps(doc, indent=2, default=str))
                return 0
            for k in ("id", "rule", "path", "version", "state", "reason", "size", "blake3", "adler32", "md5",
                      "scope", "name", "dataset", "metadata"):
                print(f"{k:>9}: {doc[k]}")
            print("  history:")
            for h in doc["history"]:
                when = dt.datetime.fromtimestamp(h["at"], dt.timezone.utc).isoformat(timespec="seconds")
                print(f"    {when}  {h['event']:<17} -> {h['to_state']:<12} {json.dumps(h['detail']) if h['detail'] else ''}")
            if doc["replicas"]:
                print("  copies written by the agent:")
                for r in doc["replicas"]:
                    print(f"    {r['location']}: {r['url']} {r['size']} bytes adler32 {r['adler32']} ({r['state']})")
            return 0
    else:
        recs = ledger.recent(limit, State(state) if state else None)
    if as_json:
        print(json.dumps([r.to_json() for r in recs], indent=2, default=str))
        return 0
    for r in recs:
        print(f"#{r.id:<6} {r.rule:<12} {r.state.value:<12} {human_bytes(r.size):>9}  {r.relpath}"
              + (f"  [{r.reason}]" if r.reason else ""))
    return 0


def nights(settings: Settings, rule: str | None, limit: int, as_json: bool) -> int:
    from .status import nights as view
    listed = view.listed(settings, _open_ledger(settings), time.time(), limit, rule)
    print(json.dumps(listed, indent=2) if as_json else view.render(listed))
    return 1 if any(n["overdue"] for n in listed) else 0


def custody(settings: Settings, path: str) -> int:
    """The custody of one path, as the status server's /custody answers it, read from the ledger."""
    from .status import custody as answer
    raw = os.fsencode(path)
    here = os.path.abspath(raw)
    if not os.path.isabs(raw) and any(answer.below(here, os.fsencode(r.directory)) for r in settings.rules.values()):
        raw = here         # typed inside a watched tree: meant from here
    ledger = _open_ledger(settings)
    try:
        code, doc = answer.answer(settings, ledger, raw)
    finally:
        ledger.close()
    print(json.dumps(doc, indent=2))
    return 0 if code == 200 else 1


def retry(settings: Settings, ids: list[int], all_: bool) -> int:
    ledger = _open_ledger(settings, readonly=False)
    if all_:
        ids = [r.id for r in ledger.in_states([State.QUARANTINED])]
    if not ids:
        print("nothing to retry (give ledger ids, or --all)", file=sys.stderr)
        return 1
    rc = 0
    for fid in ids:
        try:
            rec = ledger.get(fid)
            new = ledger.transition(fid, State.QUARANTINED, Event.OPERATOR_RETRY,
                                    {"by": os.environ.get("USER", "operator")})
            print(f"#{fid} {rec.relpath}: quarantined -> {new.state.value}")
        except KeyError:
            print(f"#{fid}: no such file", file=sys.stderr)
            rc = 1
        except StaleTransition:
            print(f"#{fid}: not quarantined (state {ledger.get(fid).state.value})", file=sys.stderr)
            rc = 1
    return rc


def audit(settings: Settings, args: argparse.Namespace) -> int:
    """Read-only reconciliation: exit 0 all well, 1 problems found (2: ConfigError, in main)."""
    from . import audit as audit_io
    from .core.audit import render
    from .errors import EdgeAgentError
    sel = audit_io.Selection(dataset=args.dataset, night=args.night, rule=args.rule)
    ledger = _open_ledger(settings)
    lake = audit_io.build(settings)
    try:
        report = audit_io.run_audit(settings, ledger, lake.records, lake.probe, sel, deep=args.deep,
                                    workers=args.workers, schemes=lake.schemes)
    except ConfigError:
        raise
    except EdgeAgentError as exc:
        # the catalogue itself could not be read: no verdict at all, which is not "all well"
        print(f"edge-agent: the audit could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        lake.close()
        ledger.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render(report, verbose=args.verbose))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
