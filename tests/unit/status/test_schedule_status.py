"""The observing schedule in /status, the page and /metrics (issue 16, part 3)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.ledger import Ledger
from edge_agent.runner import Runner
from edge_agent.settings import Settings
from edge_agent.status import page
from edge_agent.status.server import StatusServer


def test_status_page_and_metrics_show_the_schedule_and_its_alarms(tmp_path: Path,
                                                                   settings_data: Callable[..., Any]) -> None:
    s = Settings(**settings_data(tmp_path, rule={"expected": {"hours": ["00:00-23:59"], "quiet_minutes": 1}}))
    r = Runner(s, Ledger(s.ledger_path), MemoryCatalogue({}))
    r.started_at -= 3600                      # watching for an hour: quiet once a minute has passed
    assert r.schedule is not None
    r.schedule.started_at = r.started_at
    r.sample_schedule()
    srv = StatusServer(r, "127.0.0.1", 0)
    srv.start()
    try:
        base = f"http://127.0.0.1:{srv.address[1]}"
        doc = json.loads(urllib.request.urlopen(base + "/status", timeout=5).read())
        sc = doc["rules"]["r"]["schedule"]
        assert sc["expected"] is True and sc["alarms"]["quiet"] is True and sc["window"].startswith("00:00-23:59")
        assert "ALARM: quiet" in page.render(doc) and "data expected now" in page.render(doc)
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        m = {(x.name, tuple(sorted(x.labels.items()))): x.value
             for fam in text_string_to_metric_families(body) for x in fam.samples}
        assert m[("edge_agent_data_expected", (("rule", "r"),))] == 1
        assert m[("edge_agent_schedule_alarm", (("alarm", "quiet"), ("rule", "r")))] == 1
        assert m[("edge_agent_schedule_alarm", (("alarm", "slow"), ("rule", "r")))] == 0
    finally:
        srv.stop()
        for pool in r.pools.values():
            pool.shutdown()
        r.ledger.close()


def test_without_a_schedule_nothing_is_added(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    s = Settings(**settings_data(tmp_path))
    r = Runner(s, Ledger(s.ledger_path), MemoryCatalogue({}))
    try:
        assert r.schedule is None
    finally:
        for pool in r.pools.values():
            pool.shutdown()
        r.ledger.close()
