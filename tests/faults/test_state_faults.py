"""Faults in the agent's own state: the ledger's disk fills up; a ledger copied from another host."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time

import pytest

from support import Daemon
from tests.faults.local_invariants import Manifest, check
from tests.faults.mounts import fill, needs_root, tmpfs

pytestmark = pytest.mark.integration


def invariants(d: Daemon, m: Manifest, settled: bool = True) -> list[str]:
    return check(m, d.state / "ledger.sqlite", d.lakes, d.state / "lake-catalog.sqlite", copies=len(d.lakes),
                 settled=settled)


@needs_root
def test_a_full_state_disk_stops_the_work_and_nothing_is_acknowledged_that_was_not_recorded(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 0.3}})
    m = Manifest(d.rule_dir())
    with tmpfs(d.state, "32m"):
        d.start()
        m.write("before.fits", b"b" * 10_000)
        d.wait_for(lambda: d.counts().get("deleted") == 1, 20, "normal delivery")
        filler = fill(d.state)
        for i in range(200):
            m.write(f"during/f{i:03d}.fits", os.urandom(2000))
        d.wait_for(lambda: d.get("/readyz")[0] == 503, 30, "/readyz to report the ledger")
        why = json.loads(d.get("/readyz")[1])["not_ready_because"]
        assert any(w.startswith("ledger: the ledger") and "database or disk is full" in w for w in why), why
        assert d.get("/healthz")[0] == 200                    # alive, only not ready
        time.sleep(3)
        assert _left_buffer_only_if_recorded(d, m) == []
        events = [e["event"] for e in d.events()]
        assert events.count("ledger cannot be written: no new work until it can (free space in state_dir)") == 1
        assert "main loop error; going on" not in events       # no traceback flood, one clear line

        # killed while the disk is full; a restart either stops at once, saying why (exit 75: try
        # again later), or comes up and pauses as soon as the ledger cannot record a step
        d.kill9()
        assert _left_buffer_only_if_recorded(d, m) == []
        d.start(wait=False)
        assert d.proc is not None
        d.wait_for(lambda: d.proc.poll() is not None or d.get("/readyz")[0] == 503, 30, "the restart's verdict")
        if d.proc.poll() is not None:
            assert d.proc.returncode == 75
            assert "cannot be written" in d.log.read_text().splitlines()[-1]
        else:
            assert any(w.startswith("ledger:") for w in json.loads(d.get("/readyz")[1])["not_ready_because"])
            d.kill9()
        assert _left_buffer_only_if_recorded(d, m) == []

        os.unlink(filler)
        d.start()
        d.wait_for(lambda: d.counts().get("deleted") == 201, 90, "everything delivered once there is room")
        assert invariants(d, m) == []
        assert d.stop() == 0


def _left_buffer_only_if_recorded(d: Daemon, m: Manifest) -> list[str]:
    """Every file gone from the buffer was recorded as confirmed before it went."""
    db = sqlite3.connect(f"file:{d.state / 'ledger.sqlite'}?mode=ro", uri=True)
    states = {bytes(p): s for p, s in db.execute("SELECT path, state FROM files")}
    db.close()
    return [f"{rel!r} left the buffer in state {states.get(os.path.join(os.fsencode(d.rule_dir()), rel))}"
            for rel in m.files if not os.path.exists(os.path.join(os.fsencode(d.rule_dir()), rel))
            and states.get(os.path.join(os.fsencode(d.rule_dir()), rel)) not in ("confirmed", "deleted")]


def test_a_ledger_copied_from_another_host_is_refused_until_adopted(agent) -> None:
    old: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 0.3}})
    old.start()
    (old.rule_dir() / "there.fits").write_bytes(b"t" * 1000)
    old.wait_for(lambda: old.counts().get("deleted") == 1, 20, "delivery on the old host")
    assert old.stop() == 0
    # a restored backup on a new DAQ host: the same ledger, another buffer directory
    new: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 0.3}})
    new.state.mkdir()
    shutil.copy(old.state / "ledger.sqlite", new.state / "ledger.sqlite")
    m = Manifest(new.rule_dir())
    m.write("here.fits", b"h" * 2000)
    before = (new.state / "ledger.sqlite").read_bytes()
    new.start(wait=False)
    assert new.proc is not None and new.proc.wait(30) == 2
    err = new.log.read_text()
    assert "belongs to another host or buffer" in err and "edge-agent adopt-ledger" in err
    assert f"rule daq directory: ledger has '{old.rule_dir()} inode=" in err
    assert f"here it is '{new.rule_dir()} inode=" in err
    assert (new.state / "ledger.sqlite").read_bytes() == before           # refused means untouched
    assert (new.rule_dir() / "here.fits").exists()
    # the operator can look before deciding, then adopts it deliberately
    assert "there.fits" in new.cli("files").stdout
    out = new.cli("adopt-ledger")
    assert out.returncode == 0 and "adopted" in out.stdout and str(old.rule_dir()) in out.stdout
    new.start()
    new.wait_for(lambda: new.counts().get("deleted") == 2, 20, "the new host's file delivered")
    assert invariants(new, m) == []
    assert new.stop() == 0
