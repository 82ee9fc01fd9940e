"""`edge-agent status --fleet` (issue 15): every agent of a shared ledger, read from the ledger
itself, with a SQLite ledger named by ledger.agent_id (the same reads run on PostgreSQL in
tests/integration/test_ledger_postgres.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import free_port, write_toml

from edge_agent.cli import main
from edge_agent.core.lifecycle import Event, State
from edge_agent.ledger import Ledger
from edge_agent.settings import Settings


def _config(tmp_path: Path, settings_data: Callable[..., dict[str, Any]], **top: Any) -> tuple[str, Settings]:
    # nothing listens on the status port: `status` falls back to the ledger
    data = settings_data(tmp_path, status={"port": free_port()}, **top)
    cfg = tmp_path / "agent.toml"
    write_toml(cfg, data)
    return str(cfg), Settings(**data)


def _due(led: Ledger, n: int, prefix: str) -> None:
    for i in range(n):
        rec = led.discover("r", f"/daq/{prefix}{i}.fits".encode(), f"{prefix}{i}.fits", 1, i, 1000 * (i + 1), 0, 0)
        led.transition(rec.id, State.DISCOVERED, Event.COMPLETED)


@pytest.fixture
def fleet_cfg(tmp_path: Path, settings_data: Callable[..., dict[str, Any]]) -> str:
    """This config's agent a1, alive with 12 files in flight; a2 silent for 10 minutes with 2 files
    whose leases ran out; a3 silent and holding nothing (a retired host)."""
    cfg, settings = _config(tmp_path, settings_data, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"})
    now = time.time()
    led = Ledger(settings.ledger_path)
    _due(led, 2, "old")
    old = [r.id for r in led.claim("a2", [State.COMPLETE], now - 600, 2, lease_s=60)]
    led.heartbeat("a2", "daq-2", 2, "0.9", now - 600, {"sent_bytes_per_s": 2e6, "transferred_files_per_s": 1.5,
                                                        "in_flight": 2})
    _due(led, 12, "new")
    led.claim("a1", [State.COMPLETE], now, 20, lease_s=300, exclude=old)
    led.heartbeat("a1", "daq-1", 1, "1.0", now - 5, {"sent_bytes_per_s": 4e6, "in_flight": 12})
    led.heartbeat("a3", "daq-3", 3, "0.8", now - 86400)
    led.close()
    return cfg


def test_without_a_shared_ledger_it_says_there_is_no_fleet(tmp_path: Path, settings_data: Callable[..., Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg, settings = _config(tmp_path, settings_data)
    Ledger(settings.ledger_path).close()
    assert main(["-c", cfg, "status", "--fleet"]) == 0
    assert capsys.readouterr().out.startswith("no fleet: this agent's ledger is not shared")
    assert main(["-c", cfg, "status", "--fleet", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) is None and "not shared" in out.err


def test_every_agent_is_listed_and_a_silent_one_holding_claims_fails_the_command(
        fleet_cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", fleet_cfg, "status", "--fleet"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "3 agent(s), 2 silent (no heartbeat for more than 90 s)" in lines[0]
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in lines[2:5]}
    assert lines[1].split() == ["agent", "host", "version", "heartbeat", "claims", "sent/s", "files/s", "steps"]
    assert rows["a1"].startswith("*") and rows["a1"].split()[1:8] == ["a1", "daq-1", "1.0", "5", "s", "ago", "alive"]
    assert "4.0 MB" in rows["a1"] and " 12 " in rows["a1"]
    assert rows["a2"].split()[:7] == ["a2", "daq-2", "0.9", "10", "min", "ago", "SILENT"]
    assert "2 (2 expired)" in rows["a2"] and "2.0 MB" in rows["a2"] and "1.5" in rows["a2"]
    assert "SILENT" in rows["a3"] and "24.0 h ago" in rows["a3"]
    text = "\n".join(lines)
    # the files in flight per agent, a few each and how many more
    assert "in flight under a1: 12 (complete 12)" in text and "  ... and 2 more" in text
    assert "in flight under a2: 2 (complete 2)" in text
    assert "#1 r: old0.fits (complete, 1.0 kB, lease ran out 5" in text
    assert "in flight under a3" not in text


def test_json_gives_the_same_view(fleet_cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", fleet_cfg, "status", "--fleet", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    by_id = {a["agent_id"]: a for a in doc["agents"]}
    assert (by_id["a1"]["this"], by_id["a1"]["claims"], len(by_id["a1"]["in_flight"]["files"])) == (True, 12, 10)
    assert (by_id["a2"]["silent"], by_id["a2"]["expired_claims"]) == (True, 2)


def test_once_the_silent_agents_files_are_taken_over_the_command_succeeds(
        fleet_cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    led = Ledger(tmp_path / "state" / "ledger.sqlite")
    led.heartbeat("a4", "daq-4", 4, "1.0", time.time())
    taken = led.claim("a4", [State.COMPLETE], time.time(), 10, lease_s=300)     # a2's leases ran out
    assert {r.relpath for r in taken} == {"old0.fits", "old1.fits"}
    led.close()
    assert main(["-c", fleet_cfg, "status", "--fleet"]) == 0
    assert "in flight under a2" not in capsys.readouterr().out


def test_status_read_from_the_ledger_names_the_silent_agents(fleet_cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["-c", fleet_cfg, "status"])
    out = capsys.readouterr().out
    assert "the agent does not answer" in out
    assert "fleet: 3 agent(s), 14 file(s) in flight (`edge-agent status --fleet`)" in out
    assert "SILENT with 2 claim(s): a2 on daq-2, last heartbeat 10 min ago" in out
    assert "a3" not in out            # silent, but it strands nothing
