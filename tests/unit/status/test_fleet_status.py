"""The fleet in /status, the page and /metrics (issue 15): every agent of a shared ledger, read from
the ledger at most once every few seconds however often the server is asked."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import __version__
from edge_agent.core.lifecycle import Event, State
from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.ledger import Ledger
from edge_agent.runner import Runner
from edge_agent.settings import Settings
from edge_agent.status import page
from edge_agent.status.fleet import FleetCache
from edge_agent.status.server import StatusServer


def _runner(tmp_path: Path, settings_data: Callable[..., dict[str, Any]], **top: Any) -> Runner:
    s = Settings(**settings_data(tmp_path, **top))
    ledger = Ledger(s.ledger_path)
    return Runner(s, ledger, MemoryCatalogue({}))


def _stop(r: Runner) -> None:
    for pool in r.pools.values():
        pool.shutdown()
    r.ledger.close()


@pytest.fixture
def shared(tmp_path: Path, settings_data: Callable[..., dict[str, Any]]) -> Iterator[Runner]:
    """This agent (a1) heartbeating now; a2, silent for 10 minutes, still holding a file whose lease
    ran out; a name (<b>x</b>) that an operator chose badly."""
    r = _runner(tmp_path, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"})
    now = time.time()
    led = r.ledger
    rec = led.discover("r", b"/daq/night/run7.fits", "night/run7.fits", 1, 1, 4096, 0, 0)
    led.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
    assert [c.id for c in led.claim("a2", [State.COMPLETE], now - 600, 1, lease_s=60)] == [rec.id]
    led.heartbeat("a2", "daq-2", 2, "0.9", now - 600, {"sent_bytes_per_s": 5e6, "in_flight": 1})
    led.heartbeat("<b>x</b>", "daq-3", 3, "1.0", now)
    r.heartbeat()
    yield r
    _stop(r)


@pytest.fixture
def server(shared: Runner) -> Iterator[StatusServer]:
    srv = StatusServer(shared, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


def get(srv: StatusServer, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.address[1]}{path}", timeout=10) as resp:
        return bytes(resp.read())


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_status_shows_every_agent_of_the_shared_ledger_and_the_files_in_flight(server: StatusServer) -> None:
    fleet = json.loads(get(server, "/status"))["fleet"]
    by_id = {a["agent_id"]: a for a in fleet["agents"]}
    assert set(by_id) == {"a1", "a2", "<b>x</b>"}
    a1, a2 = by_id["a1"], by_id["a2"]
    assert a1["this"] and not a1["silent"] and a1["heartbeat_age_s"] < 30 and a1["version"] == __version__
    assert a1["throughput"]["in_flight"] == 0 and a1["claims"] == 0
    assert a2["silent"] and a2["heartbeat_age_s"] >= 600 and a2["host"] == "daq-2"
    assert (a2["claims"], a2["expired_claims"], a2["in_flight"]["by_state"]) == (1, 1, {"complete": 1})
    [f] = a2["in_flight"]["files"]
    assert (f["path"], f["state"], f["size"]) == ("night/run7.fits", "complete", 4096) and f["lease_left_s"] < -500
    assert a2["throughput"]["sent_bytes_per_s"] == 5e6


def test_metrics_carry_the_agent_id_and_every_agents_heartbeat_age_and_claims(server: StatusServer) -> None:
    m = samples(get(server, "/metrics"))
    assert m[("edge_agent_info", (("agent", "a1"), ("version", __version__)))] == 1
    assert m[("edge_agent_fleet_heartbeat_age_seconds", (("agent", "a2"),))] >= 600
    assert m[("edge_agent_fleet_heartbeat_age_seconds", (("agent", "a1"),))] < 30
    assert m[("edge_agent_fleet_claims", (("agent", "a2"),))] == 1
    assert m[("edge_agent_fleet_claims", (("agent", "a1"),))] == 0       # exported at 0: alerts see the agent
    assert m[("edge_agent_fleet_expired_claims", (("agent", "a2"),))] == 1
    assert m[("edge_agent_fleet_sent_bytes_per_second", (("agent", "a2"),))] == 5e6
    assert m[("edge_agent_fleet_agent_info", (("agent", "a2"), ("host", "daq-2"), ("version", "0.9")))] == 1


def test_the_ledger_is_read_once_for_many_requests_within_the_cache_time(server: StatusServer) -> None:
    assert server.fleet is not None
    for path in ("/status", "/metrics", "/", "/status", "/metrics") * 3:
        get(server, path)
    assert server.fleet.reads == 1


def test_the_cache_reads_again_once_its_time_is_up_and_ages_run_on_meanwhile(shared: Runner, clock: Any) -> None:
    wall = [time.time()]
    cache = FleetCache(shared.ledger, "a1", ttl_s=5.0, clock=lambda: wall[0], monotonic=clock)
    first = {a["agent_id"]: a for a in cache.get()["agents"]}
    clock.advance(4.9)
    wall[0] += 4.9
    again = {a["agent_id"]: a for a in cache.get()["agents"]}
    assert cache.reads == 1
    assert again["a2"]["heartbeat_age_s"] == pytest.approx(first["a2"]["heartbeat_age_s"] + 4.9, abs=0.11)
    shared.ledger.heartbeat("a2", "daq-2", 2, "0.9", wall[0])        # a2 is back
    clock.advance(0.1)
    back = {a["agent_id"]: a for a in cache.get()["agents"]}
    assert cache.reads == 2 and not back["a2"]["silent"]


def test_without_a_shared_ledger_there_is_no_fleet_and_nothing_reads_for_one(
        tmp_path: Path, settings_data: Callable[..., dict[str, Any]]) -> None:
    r = _runner(tmp_path, settings_data)
    srv = StatusServer(r, "127.0.0.1", 0)
    srv.start()
    try:
        assert srv.fleet is None
        assert "fleet" not in json.loads(get(srv, "/status"))
        m = samples(get(srv, "/metrics"))
        assert m[("edge_agent_info", (("agent", ""), ("version", __version__)))] == 1
        assert not [k for k in m if k[0].startswith("edge_agent_fleet_")]
        assert b"<h2>Fleet</h2>" not in get(srv, "/")      # (the script only draws what the document has)
    finally:
        srv.stop()
        _stop(r)


def test_the_page_shows_the_fleet_without_script_and_escapes_the_names(server: StatusServer) -> None:
    text = get(server, "/").decode()
    static = text.split("<div id=static>", 1)[1].split("</div>\n<footer>", 1)[0]
    assert "<h2>Fleet</h2>" in static
    rows = {row.split("</th>", 1)[0].rsplit(">", 1)[1]: row for row in static.split("<tr")[1:]}
    assert "SILENT" in rows["a2"] and rows["a2"].startswith(" class=bad") and "daq-2" in rows["a2"]
    assert "alive" in rows["* a1"] and "class=bad" not in rows["* a1"]
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in static
    # the script draws the same from the embedded document (its drawing: tests/integration/test_status_page.py)
    assert "function fleet(f)" in text and "parts.push(fleet(doc.fleet))" in text


def test_render_of_a_document_without_fleet_has_no_fleet_table() -> None:
    doc = {"version": "1", "generated_at": 0.0, "rules": {}, "ready": True}
    assert "Fleet" not in page.render(doc).split("<script", 1)[0]
