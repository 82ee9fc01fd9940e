"""The fleet view on a PostgreSQL ledger (issue 15), end to end: a real agent heartbeating into a
schema of its own on the lake's PostgreSQL, another agent of the same ledger gone silent with a
file claimed; `edge-agent status --fleet`, /status and /metrics all show both."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Daemon

from edge_agent.core.lifecycle import Event, State
from edge_agent.ledger import Ledger

from ..pgledger import schema_url

pytestmark = [pytest.mark.integration, pytest.mark.lake]


@pytest.fixture
def pg(lake: Any) -> Iterator[tuple[str, str]]:
    yield from schema_url(lake)


def test_every_agent_of_a_postgresql_ledger_is_shown_and_a_silent_one_is_named(
        pg: tuple[str, str], tmp_path: Path, daemons: list[Daemon]) -> None:
    url, password = pg
    secret = tmp_path / "ledger.password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    d = Daemon(tmp_path / "a", rules={"daq": {"completion": ["renamed"]}}, ledger={"url": url, "password_file": str(secret), "agent_id": "daq-1"})
    daemons.append(d)      # (set up after pg: stopped before the schema goes)
    d.start()
    # another agent of the ledger: it claimed a file of its own rule and went silent
    led = Ledger(url, password=password, lease_clock="caller")    # its claim and heartbeat 10 minutes old
    try:
        now = time.time()
        rec = led.discover("spectra", b"/elsewhere/run9.fits", "run9.fits", 1, 1, 4096, 0, 0)
        led.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
        assert led.claim("daq-2", [State.COMPLETE], now - 600, 1, lease_s=60, rules=["spectra"])
        led.heartbeat("daq-2", "host-2", 2, "0.9", now - 600, {"sent_bytes_per_s": 1e6})
    finally:
        led.close()
    d.wait_for(lambda: len(d.status().get("fleet", {}).get("agents", [])) == 2, 30, "both agents")

    out = d.cli("status", "--fleet")
    assert out.returncode == 1, out.stderr            # a silent agent holds a claim
    assert "2 agent(s), 1 silent" in out.stdout and password not in out.stdout
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line
            for line in out.stdout.splitlines()[2:4]}
    assert rows["daq-1"].startswith("*") and " alive " in rows["daq-1"]
    assert " SILENT " in rows["daq-2"] and "1 (1 expired)" in rows["daq-2"]
    assert "in flight under daq-2: 1 (complete 1)" in out.stdout and "spectra: run9.fits" in out.stdout

    doc = json.loads(d.cli("status", "--fleet", "--json").stdout)
    me = {a["agent_id"]: a for a in doc["agents"]}["daq-1"]
    assert me["this"] and not me["silent"] and "sent_bytes_per_s" in me["throughput"]

    body = d.get("/metrics")[1].decode()
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert m[("edge_agent_fleet_claims", (("agent", "daq-2"),))] == 1
    assert m[("edge_agent_fleet_heartbeat_age_seconds", (("agent", "daq-2"),))] >= 600
    assert m[("edge_agent_fleet_heartbeat_age_seconds", (("agent", "daq-1"),))] < 60
    assert next(labels for name, labels in m if name == "edge_agent_info")[0] == ("agent", "daq-1")
    assert d.stop() == 0
