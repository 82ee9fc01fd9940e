"""kill -9 with the ledger on PostgreSQL (issue 15): the crash tests of test_crashes.py again, the
agent a real process whose ledger is a schema of its own on the lake's PostgreSQL server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import Daemon

from ..pgledger import schema_url
from .test_crashes import (test_a_crash_at_each_step_boundary_is_finished_without_errors,  # noqa: F401
                           test_kill9_right_after_deletion_started_is_finished_on_restart,
                           test_kill9_storm_loses_nothing_and_leaves_no_half_copies)

pytestmark = [pytest.mark.integration, pytest.mark.lake]


@pytest.fixture
def agent(lake: Any, tmp_path: Path, daemons: list[Daemon]) -> Iterator[Callable[..., Daemon]]:
    """The agent of test_crashes.py, its ledger on PostgreSQL (the password in a file of its own)."""
    for url, password in schema_url(lake):
        secret = tmp_path / "ledger.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)

        def make(**kw: Any) -> Daemon:
            d = Daemon(tmp_path / f"a{len(daemons)}", ledger={"url": url, "password_file": str(secret)}, **kw)
            daemons.append(d)
            return d
        yield make
        for d in daemons:       # stopped before the schema goes (the daemons fixture would be too late)
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def test_the_agent_keeps_its_ledger_on_postgresql(agent: Callable[..., Daemon]) -> None:
    d = agent(rules={"daq": {"completion": ["renamed"]}})
    (d.rule_dir() / "p.fits").write_bytes(b"p" * 10_000)
    d.start()
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "delivery")
    assert not (d.state / "ledger.sqlite").exists()           # nothing in the state directory ...
    assert [r["state"] for r in d.files()] == ["deleted"]    # ... and the CLI reads the same ledger
    assert "edge-ledger" not in d.log.read_text()             # the password never reaches the log
    # the agent works under claims, with a heartbeat; none is left once its steps are done
    from edge_agent.ledger import Ledger
    doc = d.doc["ledger"]
    led = Ledger(doc["url"], password=Path(doc["password_file"]).read_text().strip(), readonly=True)
    try:
        [me] = led.agents()
        assert me["agent_id"].endswith(str(d.state)) and me["claims"] == 0 and me["heartbeat_at"] > 0
        assert {r.claim_until or 0 for r in led.iter_all()} == {0}          # every claim given back
    finally:
        led.close()
    assert d.stop() == 0
