"""A fleet against the real lake (issue 15): three agent processes share one buffer and one
PostgreSQL ledger and push to Rucio + XRootD (two RSEs, copies = 2) while a DAQ writes and kill -9
hits random agents. After every kill, and once all is delivered, the lake checker compares the
manifest with the buffer, the ledger, Rucio and the bytes on the storage: nothing lost, nothing
deleted before two AVAILABLE replicas held its bytes, nothing half-registered, no orphan."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from edge_agent.localfs import is_agent_temp
from support import Daemon
from tests.faults.lake_invariants import check
from tests.faults.local_invariants import Manifest, _ledger_rows
from tests.faults.test_lake_storm import DaqWriter
from tests.integration.test_rucio_lake import uid

from ..pgledger import schema_url

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]

FILES = int(os.environ.get("EDGE_FLEET_FILES", "45"))
KILLS = int(os.environ.get("EDGE_FLEET_KILLS", "10"))
SEED = int(os.environ.get("EDGE_FLEET_SEED", "20261207"))


@pytest.fixture
def pg(lake: Any) -> Iterator[tuple[str, str]]:
    yield from schema_url(lake)


def test_three_agents_share_a_night_into_the_real_lake_through_a_kill9_storm(
        lake: Any, pg: tuple[str, str], tmp_path: Path, daemons: list[Daemon]) -> None:
    url, password = pg
    secret = tmp_path / "ledger.password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    u = uid()
    buffer = tmp_path / "shared" / "daq"
    buffer.mkdir(parents=True)
    dests = {"lake1": {"kind": "rse", "rse": lake.lake_rses[0], "scheme": "http"},
             "lake2": {"kind": "rse", "rse": lake.lake_rses[1], "scheme": "http"}}
    agents = []
    for i in range(3):
        d = Daemon(tmp_path / f"agent{i}", destinations=dests, transfer_workers=2,
                   rules={"daq": {"directory": str(buffer), "scope": lake.scope, "completion": ["renamed"],
                                  "destinations": list(dests), "copies": 2,
                                  "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night"}},
                   lake=lake.agent_lake_config(timeout_seconds=20),
                   ledger={"url": url, "password_file": str(secret), "agent_id": f"agent{i}", "lease_seconds": 30})
        daemons.append(d)
        agents.append(d)
    ledger = (url, password)
    rng = random.Random(SEED)
    manifest = Manifest(buffer)
    writer = DaqWriter(buffer, manifest, FILES, SEED + 1)
    for d in agents:
        d.start()
    writer.start()
    safe: set[bytes] = set()
    try:
        for kill in range(1, KILLS + 1):
            time.sleep(rng.uniform(0.5, 2.5))
            victim = rng.choice(agents)
            victim.kill9()
            now = writer.snapshot(safe)
            problems = check(now, ledger, lake, f"{u}.", copies=2, settled=False, buffer_rse=lake.buf_rse)
            assert problems == [], f"after kill {kill}:\n" + "\n".join(problems)
            safe |= {rel for rel in now.files if not (buffer / os.fsdecode(rel)).exists()}
            victim.start(wait=False)
        writer.join(120)
        assert writer.error is None, writer.error

        def all_deleted() -> bool:
            rows = _ledger_rows(ledger)
            return len(rows) == FILES and all(r["state"] == "deleted" for r in rows)
        agents[0].wait_for(all_deleted, 600, f"all {FILES} files delivered and deleted by the fleet")
    finally:
        for d in agents:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
    assert sorted(p.name for p in buffer.rglob("*") if p.is_file() and not is_agent_temp(p.name)) == []
    problems = check(manifest, ledger, lake, f"{u}.", copies=2, settled=True, buffer_rse=lake.buf_rse)
    assert problems == [], "\n".join(problems)
    for d in agents:
        assert not [e for e in d.events() if e.get("event") == "unexpected error"]
        assert "Traceback" not in d.log.read_text()
