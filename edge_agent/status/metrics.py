"""Prometheus metrics, collected at scrape time from the ledger and the runner's gauges."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from ..core.lifecycle import BACKLOG, State
from . import nights
from .report import STATE_ORDER

if TYPE_CHECKING:
    from ..runner import Runner
    from ..schedule import ScheduleWatch
    from .fleet import FleetCache


class _Collector:
    def __init__(self, runner: "Runner", fleet: FleetCache | None = None) -> None:
        self.runner = runner
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        runner = self.runner
        now = time.time()
        files = GaugeMetricFamily("edge_agent_files", "Files per rule and lifecycle state", labels=["rule", "state"])
        nbytes = GaugeMetricFamily("edge_agent_file_bytes", "Bytes of files per rule and state",
                                   labels=["rule", "state"])
        seen: dict[tuple[str, str], tuple[int, int]] = {(rule, s): (0, 0) for rule in runner.settings.rules for s in STATE_ORDER}
        for rule, state, n, b in runner.ledger.counts():
            seen[(rule, state)] = (n, b)
        for (rule, state), (n, b) in sorted(seen.items()):
            files.add_metric([rule, state], n)
            nbytes.add_metric([rule, state], b)
        yield files
        yield nbytes
        # the alert rules' "backlog" (packaging/monitoring): not yet confirmed and still moving
        bl_files = GaugeMetricFamily("edge_agent_backlog_files", "Files not yet confirmed in the lake and still "
                                     "being worked on (quarantined ones excluded)", labels=["rule"])
        bl_bytes = GaugeMetricFamily("edge_agent_backlog_bytes", "Bytes of edge_agent_backlog_files",
                                     labels=["rule"])
        backlog = {s.value for s in BACKLOG}
        for rule in runner.settings.rules:
            rows = [v for (ru, st), v in seen.items() if ru == rule and st in backlog]
            bl_files.add_metric([rule], sum(n for n, _ in rows))
            bl_bytes.add_metric([rule], sum(b for _, b in rows))
        yield bl_files
        yield bl_bytes
        counters = runner.counters
        yield _counter("edge_agent_sent_bytes", "Bytes streamed to destinations", ["rule", "destination"],
                       sorted(counters.sent_by_location.items()))
        yield _counter("edge_agent_hashed_bytes", "Bytes read for hashing", ["rule"],
                       [((rule,), rate.total) for rule, rate in counters.hashed.items()])
        yield _counter("edge_agent_transitions", "Lifecycle transitions since start", ["rule", "to_state"],
                       sorted(counters.transitions.items()))
        yield _counter("edge_agent_extractor_skipped", "Files sent without their rule's extractor's keys: "
                       "it failed and the rule says on_failure = skip", ["rule"],
                       [((rule,), counters.extractor_skipped.get(rule, 0)) for rule, r in runner.settings.rules.items()
                        if r.extractor is not None])
        oldest = runner.ledger.oldest_unconfirmed()
        yield GaugeMetricFamily("edge_agent_oldest_unconfirmed_age_seconds",
                                "Age of the oldest file not yet confirmed in the lake",
                                value=0 if oldest is None else now - oldest.first_seen)
        attention = sum(1 for rec in runner.ledger.in_states([State.TRANSFERRED, State.CONFIRMED]) if rec.reason)
        yield GaugeMetricFamily("edge_agent_attention_files", "Files held back with a warning: replication "
                                "stuck or overdue, or a replica that failed verification (see /status "
                                "'attention')", value=attention)
        yield GaugeMetricFamily("edge_agent_lake_up", "1 if the lake answered its last health check",
                                value=0 if runner.lake_problem else 1)
        used = GaugeMetricFamily("edge_agent_buffer_used_ratio", "Used fraction of the buffer filesystem",
                                 labels=["rule"])
        ttf = GaugeMetricFamily("edge_agent_buffer_seconds_to_full",
                                "Forecast seconds until the buffer is full (-1: not filling)", labels=["rule"])
        for rule, d in runner.disks.items():
            if d.last:
                used.add_metric([rule], d.last.used_fraction)
                ttf.add_metric([rule], -1 if d.last.seconds_to_full is None else d.last.seconds_to_full)
        yield used
        yield ttf
        # exported so that an alert compares against the agent's own configuration, not a copy of it
        marks = GaugeMetricFamily("edge_agent_buffer_watermark_ratio", "Configured buffer watermarks "
                                  "(fraction of the filesystem)", labels=["rule", "level"])
        for rule, cfg in runner.settings.rules.items():
            marks.add_metric([rule, "warning"], cfg.watermark_warn_percent / 100)
            marks.add_metric([rule, "critical"], cfg.watermark_critical_percent / 100)
        yield marks
        yield GaugeMetricFamily("edge_agent_notices", "Entries in watched trees the agent will not handle",
                                value=len(runner.ledger.notices(10_000)))
        yield CounterMetricFamily("edge_agent_event_overflows", "inotify queue overflows: events were lost "
                                  "and every rule was rescanned", value=runner.discovery.watcher.overflows)
        yield GaugeMetricFamily("edge_agent_steps_in_flight", "Steps running now", value=len(runner.in_flight))
        if runner.schedule is not None:
            yield from _schedule(runner.schedule)
        if runner.uplink is not None:
            share = runner.uplink.report()
            yield GaugeMetricFamily("edge_agent_uplink_share_mbps", "This agent's share of the fleet's bandwidth "
                                    "cap in force, MB/s (+Inf: no cap now)", value=math.inf
                                    if share["share_bytes_per_s"] is None else share["share_bytes_per_s"] / 1e6)
            yield GaugeMetricFamily("edge_agent_uplink_agents", "Agents sharing the bandwidth cap (posts fresh "
                                    "in the ledger, this one included)", value=share["agents"])
        yield from _nights(nights.summary(runner.settings, runner.ledger, now))
        # the agent id on one info series, not on every series: joined where wanted
        # (`... * on (instance, job) group_left (agent) edge_agent_info`, docs/monitoring.md)
        info = GaugeMetricFamily("edge_agent_info", "Build information, and this agent's id in a shared "
                                 "ledger (empty: not shared)", labels=["version", "agent"])
        info.add_metric([__version__, runner.agent_id or ""], 1)
        yield info
        if self.fleet is not None:
            yield from _fleet(self.fleet.get())


def _nights(per_rule: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """Rules with close_nights: their nights as the ledger's book records them."""
    def gauge(name: str, doc: str, value: Callable[[dict[str, Any]], float | None]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["rule"])
        for rule, s in sorted(per_rule.items()):
            v = value(s)
            if v is not None:
                family.add_metric([rule], v)
        return family

    yield gauge("edge_agent_nights_open", "Nights not closed yet (open, or their close-out under way)",
                lambda s: s["open"])
    yield gauge("edge_agent_nights_overdue", "Nights not closed night_deadline_hours after their rollover",
                lambda s: s["overdue"])
    closed = GaugeMetricFamily("edge_agent_nights_closed", "Nights closed, by verdict", labels=["rule", "verdict"])
    for rule, s in sorted(per_rule.items()):
        for verdict in ("complete", "incomplete"):
            closed.add_metric([rule, verdict], s[verdict])
    yield closed
    yield gauge("edge_agent_night_late_files", "Files hashed after their night was closed (in late datasets)",
                lambda s: s["late_files"])
    yield gauge("edge_agent_night_last_closed_timestamp_seconds", "When the rule's last night was closed",
                lambda s: s["last_closed"])


def _fleet(view: dict[str, Any]) -> Iterator[Metric]:
    """Every agent of the shared ledger, as this agent reads it (each agent of a fleet exports the
    same view: alerts aggregate by `agent`)."""
    agents = view["agents"]

    def gauge(name: str, doc: str, value: Callable[[dict[str, Any]], float | None]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["agent"])
        for a in agents:
            v = value(a)
            if v is not None:
                family.add_metric([a["agent_id"]], v)
        return family

    info = GaugeMetricFamily("edge_agent_fleet_agent_info", "Every agent of the shared ledger: its host and "
                             "version", labels=["agent", "host", "version"])
    for a in agents:
        info.add_metric([a["agent_id"], a["host"] or "", a["version"] or ""], 1)
    yield info
    # an agent without a heartbeat row (claims under a name that never heartbeated) has no age
    yield gauge("edge_agent_fleet_heartbeat_age_seconds", "Seconds since each agent's last heartbeat",
                lambda a: a["heartbeat_age_s"])
    yield gauge("edge_agent_fleet_claims", "Files claimed under each agent's name and not given back "
                "(in flight; with a silent agent, waiting for its leases to run out)", lambda a: a["claims"])
    yield gauge("edge_agent_fleet_expired_claims", "Of edge_agent_fleet_claims, those whose lease has run out",
                lambda a: a["expired_claims"])
    yield gauge("edge_agent_fleet_sent_bytes_per_second", "Bytes each agent sent per second over its last "
                "heartbeat interval", lambda a: a["throughput"].get("sent_bytes_per_s"))
    yield gauge("edge_agent_fleet_transferred_files_per_second", "Files each agent brought to `transferred` "
                "per second over its last heartbeat interval",
                lambda a: a["throughput"].get("transferred_files_per_s"))


def _counter(name: str, documentation: str, labels: list[str],
             samples: Iterable[tuple[tuple[str, ...], float]]) -> CounterMetricFamily:
    """A counter family with one sample per (label values, value)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in samples:
        family.add_metric(list(values), n)
    return family


def registry_for(runner: "Runner", fleet: FleetCache | None = None) -> CollectorRegistry:
    """The registry /metrics renders: `runner`'s metrics, and with `fleet` every agent of the shared ledger."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(runner, fleet))  # type: ignore[arg-type]
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def _schedule(watch: ScheduleWatch) -> Iterator[Metric]:
    """The observing schedule of the rules that have one (core/schedule.py, the alert rules)."""
    state = watch.report()
    expected = GaugeMetricFamily("edge_agent_data_expected", "1 while the rule's data are expected "
                                 "(rules.*.expected)", labels=["rule"])
    alarm = GaugeMetricFamily("edge_agent_schedule_alarm", "1 while an alarm of the rule's observing schedule "
                              "holds: quiet (no new file while expected), outside (files outside the expected "
                              "time in the last hour), slow (fewer than min_files_per_hour)", labels=["rule", "alarm"])
    last = GaugeMetricFamily("edge_agent_last_new_file_timestamp_seconds", "When the rule's last new file was "
                             "discovered (a shared ledger: by any agent)", labels=["rule"])
    hour = GaugeMetricFamily("edge_agent_new_files_last_hour", "New files of the rule in the last hour", labels=["rule"])
    for rule, st in sorted(state.items()):
        expected.add_metric([rule], 1 if st["expected"] else 0)
        for name, on in sorted(st["alarms"].items()):
            alarm.add_metric([rule, name], 1 if on else 0)
        if st["last_file_at"] is not None:
            last.add_metric([rule], st["last_file_at"])
        hour.add_metric([rule], st["files_last_hour"])
    yield expected
    yield alarm
    yield last
    yield hour
    yield _counter("edge_agent_new_files_outside_expected", "New files discovered while the rule's data were not "
                   "expected (since start)", ["rule"], [((r,), n) for r, n in sorted(watch.outside_total.items())])
