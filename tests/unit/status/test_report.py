"""What /status and /metrics say about backlogs, history and watermarks, from a real ledger and runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.core.lifecycle import Event, State
from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.ledger import Ledger
from edge_agent.runner import Runner
from edge_agent.settings import Settings
from edge_agent.status import metrics, report


@pytest.fixture
def runner(tmp_path: Path, clock: Any, settings_data: Callable[..., dict[str, Any]]) -> Iterator[Runner]:
    clock.now = 6000.0
    s = Settings(**settings_data(tmp_path, rule={"watermark_warn_percent": 70, "watermark_critical_percent": 85}))
    ledger = Ledger(s.ledger_path, clock=clock)
    # three files of rule r: one just seen, one complete, one quarantined
    for i, (name, size) in enumerate((("a", 10), ("b", 20), ("c", 30))):
        rec = ledger.discover("r", f"/x/{name}".encode(), name, 1, i, size, 0, 0)
        if name in ("b", "c"):
            rec = ledger.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
        if name == "c":
            ledger.transition(rec.id, State.COMPLETE, Event.FAILED_PERMANENT, {"reason": "zero-byte file"})
    r = Runner(s, ledger, MemoryCatalogue({}), clock=clock)   # healthy; no file moves here
    yield r
    for pool in r.pools.values():
        pool.shutdown()
    ledger.close()


def scrape(r: Runner) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = metrics.render(metrics.registry_for(r)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_backlog_counts_unconfirmed_moving_files_but_not_quarantined_ones(runner: Runner) -> None:
    doc = report.full(runner)
    assert doc["rules"]["r"]["backlog"] == {"files": 2, "bytes": 30}
    assert doc["rules"]["r"]["states"]["quarantined"] == {"files": 1, "bytes": 30}
    m = scrape(runner)
    assert m[("edge_agent_backlog_files", (("rule", "r"),))] == 2
    assert m[("edge_agent_backlog_bytes", (("rule", "r"),))] == 30
    assert m[("edge_agent_files", (("rule", "r"), ("state", "quarantined")))] == 1


def test_watermarks_are_exported_as_ratios_per_rule(runner: Runner) -> None:
    m = scrape(runner)
    assert m[("edge_agent_buffer_watermark_ratio", (("level", "warning"), ("rule", "r")))] == 0.70
    assert m[("edge_agent_buffer_watermark_ratio", (("level", "critical"), ("rule", "r")))] == 0.85


def test_history_holds_the_last_hour_of_sent_bytes_and_backlog(runner: Runner, clock: Any) -> None:
    runner.sample_backlog()
    runner._on_sent("r", "a", 1000)
    clock.advance(60)
    runner._on_sent("r", "a", 500)
    runner._on_sent("r", "b", 500)
    h = report.full(runner)["rules"]["r"]["history"]
    assert h["bucket_s"] == 60 and h["last_bucket_start"] == 6060.0
    assert len(h["sent_bytes"]) == len(h["backlog_files"]) == len(h["backlog_bytes"]) == 60
    # started at 6000 (a minute boundary): the minutes before are unknown, not idle
    assert h["sent_bytes"][-2:] == [1000, 1000] and h["sent_bytes"][:-2] == [None] * 58
    # sampled once, in the first minute; the minute now running has no sample yet
    assert h["backlog_files"][-2:] == [2, None] and h["backlog_bytes"][-2:] == [30, None]


def test_from_ledger_reports_the_backlog_without_a_running_daemon(runner: Runner) -> None:
    doc = report.from_ledger(runner.settings, runner.ledger)
    assert doc["rules"]["r"]["backlog"] == {"files": 2, "bytes": 30}


def test_the_document_says_what_it_cost_so_the_page_can_poll_less_often(runner: Runner) -> None:
    doc = report.full(runner)
    assert 0 <= doc["build_s"] < 60


def test_the_page_embeds_the_document_so_that_no_name_can_end_its_script(runner: Runner) -> None:
    import json
    import re

    from edge_agent.status import page
    doc = report.full(runner)
    doc["quarantined"] = [{"file_id": 9, "rule": "r", "path": "</script><script>alert(1)</script>&amp;.fits",
                           "size": 0, "reason": "zero-byte", "since_s": 1}]
    text = page.render(doc)
    embedded = re.search(r"<script id=initial type=application/json>(.*?)</script>", text, re.S)
    assert embedded is not None
    assert json.loads(embedded.group(1)) == json.loads(json.dumps(doc, default=str))    # whole and exact
    assert "<script>alert" not in text and "</script><script>" not in embedded.group(1)
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;&amp;amp;.fits" in text     # the no-script table
    # self-contained: nothing fetched but /status
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", text)


def test_history_is_all_known_once_the_agent_has_run_an_hour(runner: Runner, clock: Any) -> None:
    clock.advance(3 * 3600 + 30)
    sent = report.full(runner)["rules"]["r"]["history"]["sent_bytes"]
    assert sent == [0] * 60


def test_metrics_export_the_runners_byte_and_transition_counters(runner: Runner) -> None:
    runner.counters.sent_by_location.update({("r", "lake2"): 7, ("r", "lake1"): 5})
    runner.counters.hashed["r"].add(12)
    runner.counters.transitions.update({("r", "hashed"): 2, ("r", "deleted"): 1})
    m = scrape(runner)
    assert m[("edge_agent_sent_bytes_total", (("destination", "lake1"), ("rule", "r")))] == 5
    assert m[("edge_agent_sent_bytes_total", (("destination", "lake2"), ("rule", "r")))] == 7
    assert m[("edge_agent_hashed_bytes_total", (("rule", "r"),))] == 12
    assert m[("edge_agent_transitions_total", (("rule", "r"), ("to_state", "hashed")))] == 2
    assert m[("edge_agent_transitions_total", (("rule", "r"), ("to_state", "deleted")))] == 1
