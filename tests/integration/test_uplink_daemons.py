"""One uplink for a fleet (issue 15), with real agents: two `edge-agent run` processes sharing a
PostgreSQL ledger under one bandwidth cap send, together, no more than that cap (each alone would
send all of it), and each shows its share in /status and /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import Daemon

from ..pgledger import schema_url

pytestmark = [pytest.mark.integration, pytest.mark.lake]

CAP_MBPS = 4.0
MB = 1_000_000


@pytest.fixture
def fleet(lake: Any, tmp_path: Path, daemons: list[Daemon]) -> Iterator[list[Daemon]]:
    """Two agents, each with its own buffer, rule and local lake, on one PostgreSQL ledger under one cap."""
    for url, password in schema_url(lake):
        secret = tmp_path / "ledger.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        for name in ("a", "b"):
            daemons.append(Daemon(tmp_path / name, rules={f"daq{name}": {"completion": ["renamed"]}},
                                  bandwidth_mbps=CAP_MBPS,
                                  ledger={"url": url, "password_file": str(secret), "agent_id": name}))
        yield list(daemons)
        for d in daemons:       # stopped before the schema goes
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def sent_bytes(d: Daemon) -> float:
    code, body = d.get("/metrics")
    assert code == 200
    return sum(s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples
               if s.name == "edge_agent_sent_bytes_total")


def share_mbps(d: Daemon) -> float:
    code, body = d.get("/metrics")
    assert code == 200
    [value] = [s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples
               if s.name == "edge_agent_uplink_share_mbps"]
    return value


def test_two_agents_under_one_cap_send_that_cap_together(fleet: list[Daemon]) -> None:
    for d in fleet:
        rule = next(iter(d.doc["rules"]))
        for i in range(16):                                # 16 MB, in two copies: 8 s at the whole cap
            (d.rule_dir(rule) / f"{d.base.name}{i:02d}.fits").write_bytes(bytes([i]) * MB)
    for d in fleet:
        d.start()
    for d in fleet:
        d.wait_for(lambda d=d: (d.status()["agent"]["uplink"] or {}).get("agents") == 2, 20,
                   "the agent to see the other one")
    # sent by both over a few seconds: the cap (one bucket's burst and a chunk on credit each aside),
    # not twice the cap as two agents each holding the whole cap would send
    before, t0 = sum(sent_bytes(d) for d in fleet), time.monotonic()
    time.sleep(6)
    rate = (sum(sent_bytes(d) for d in fleet) - before) / (time.monotonic() - t0)
    assert 0.5 * CAP_MBPS * MB < rate < 1.3 * CAP_MBPS * MB, rate / MB
    ups = [d.status()["agent"]["uplink"] for d in fleet]
    assert all(u["cap_bytes_per_s"] == CAP_MBPS * MB and u["problem"] is None for u in ups), ups
    assert sum(u["share"] for u in ups) <= 1.0 + 1e-3, ups     # (each rounded to 4 places)
    assert sum(share_mbps(d) for d in fleet) <= CAP_MBPS + 1e-3
    # one agent stops: within the stale horizon and a round the other has the whole cap
    assert fleet[0].stop() == 0
    fleet[1].wait_for(lambda: fleet[1].status()["agent"]["uplink"]["share"] == 1.0, 30,
                      "the other agent to take the whole cap")
    assert share_mbps(fleet[1]) == CAP_MBPS
