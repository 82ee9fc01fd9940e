"""`edge-agent audit` and the access API on the local lake (directories + the local catalogue),
after a real agent process moved a night."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import Daemon

from edge_agent.access import ChecksumMismatch, Lake
from edge_agent.core.policy import night_of

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _structlog_as_it_was():  # type: ignore[no-untyped-def]
    """Lake() sets structlog up (warnings only) when nobody did; other tests expect the defaults."""
    yield
    import structlog
    structlog.reset_defaults()


def tree_digest(*roots: Path) -> dict[str, tuple[str, float]]:
    """Every file under `roots`: content hash and mtime (to prove the audit changed nothing).

    SQLite's -wal/-shm companions are left out: a read-only connection to a WAL database creates
    them (empty of data) when the agent is not running; the databases themselves must not change."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(("-wal", "-shm")):
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
    return out


def moved_night(agent, n: int = 3) -> tuple[Daemon, dict[str, bytes]]:
    d = agent()
    d.start()
    files = {}
    for i in range(n):
        data = os.urandom(20_000 + i)
        (d.rule_dir() / f"f{i}.fits").write_bytes(data)
        files[f"f{i}.fits"] = data
    d.wait_for(lambda: d.counts().get("deleted") == n, 60, f"{n} files deleted")
    return d, files


def audit(d: Daemon, *args: str) -> tuple[int, dict]:
    r = d.cli("audit", "--json", *args)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_clean_night_then_each_injected_problem_under_its_heading(agent) -> None:
    d, files = moved_night(agent)
    night = night_of(time.time(), 12, dt.timezone.utc)
    # the daemon still runs: the audit only reads its ledger
    r = d.cli("audit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALL WELL" in r.stdout and "3 ok" in r.stdout
    rc, doc = audit(d, "--night", f"{night[:4]}-{night[4:6]}-{night[6:]}")
    assert rc == 0 and doc["counts"]["ok"] == 3 and doc["ok"] is True
    assert sorted(f["did"] for f in doc["files"]["ok"]) == [f"test:{n}" for n in sorted(files)]
    assert all(sorted(f["good_copies"]) == ["lake1", "lake2"] for f in doc["files"]["ok"])
    assert d.stop() == 0

    # inject: one copy's bytes changed, one copy gone, an unknown file in the buffer
    bad = d.lakes["lake2"] / "test" / "f0.fits"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    (d.lakes["lake1"] / "test" / "f1.fits").unlink()
    stray = d.rule_dir() / "stray.fits"
    stray.write_bytes(b"x" * 1000)
    old = time.time() - 3600
    os.utime(stray, (old, old))
    before = tree_digest(d.state, d.buffer, *d.lakes.values())

    rc, doc = audit(d)
    assert rc == 1 and doc["ok"] is False
    mism = doc["files"]["checksum_mismatch"]
    assert [f["did"] for f in mism] == ["test:f0.fits"]
    assert any(x["location"] == "lake2" and x["verdict"] == "checksum_mismatch" for x in mism[0]["findings"])
    assert [f["did"] for f in doc["files"]["missing_replica"]] == ["test:f1.fits"]
    assert [f["path"] for f in doc["files"]["unknown_in_buffer"]] == [str(stray)]
    assert [f["did"] for f in doc["files"]["ok"]] == ["test:f2.fits"]

    r = d.cli("audit")
    assert r.returncode == 1
    text = r.stdout
    assert "PROBLEMS: 3 of 4 files need attention" in text
    for heading, what in (("CHECKSUM MISMATCH", "test:f0.fits"), ("MISSING REPLICA", "test:f1.fits"),
                          ("UNKNOWN IN THE BUFFER", str(stray))):
        assert heading in text and what in text.split(heading, 1)[1], (heading, text)
    # --deep reads the copies through and comes to the same verdicts
    rc, deep = audit(d, "--deep")
    assert rc == 1 and deep["counts"] == doc["counts"]
    # read-only: nothing in the state directory, the buffer or the lake changed
    assert tree_digest(d.state, d.buffer, *d.lakes.values()) == before

    # selections
    rc, doc = audit(d, "--night", "2001-01-01")
    assert rc == 0 and sum(doc["counts"].values()) == 0
    rc, doc = audit(d, "--dataset", f"test:daq.{night}")
    assert rc == 1 and doc["counts"]["ok"] == 1 and doc["counts"]["checksum_mismatch"] == 1
    assert doc["counts"]["unknown_in_buffer"] == (1 if night_of(old, 12, dt.timezone.utc) == night else 0)
    for bad_args in (["--rule", "nope"], ["--night", "yesterday"], ["--dataset", "noscope"]):
        r = d.cli("audit", *bad_args)
        assert r.returncode == 2 and "edge-agent:" in r.stderr, (bad_args, r.stderr)


def test_access_api_on_the_local_lake_verifies_what_it_reads(agent, tmp_path: Path) -> None:
    d, files = moved_night(agent, 2)
    night = night_of(time.time(), 12, dt.timezone.utc)
    with Lake.from_config(d.config) as lake:
        listed = lake.list_files(f"test:daq.{night}")
        assert [f.did for f in listed] == ["test:f0.fits", "test:f1.fits"]
        assert [r.rse for r in lake.replicas("test:f0.fits")] == ["lake1", "lake2"]
        assert lake.read_bytes("test:f0.fits") == files["f0.fits"]
        out = lake.download("test:f1.fits", tmp_path)
        assert out == tmp_path / "f1.fits" and out.read_bytes() == files["f1.fits"]
        # a corrupt copy is never read silently: the stream raises at its end, naming the copy
        p = d.lakes["lake1"] / "test" / "f0.fits"
        data = bytearray(p.read_bytes())
        data[0] ^= 1
        p.write_bytes(bytes(data))
        with pytest.raises(ChecksumMismatch, match="lake1"):
            lake.read_bytes("test:f0.fits", rse="lake1")
        (tmp_path / "dl").mkdir()
        with pytest.raises(ChecksumMismatch):
            lake.download("test:f0.fits", tmp_path / "dl", rse="lake1")
        assert not (tmp_path / "dl" / "f0.fits").exists() and list((tmp_path / "dl").iterdir()) == []
        assert lake.verify("test:f0.fits", rse="lake2") == "lake2"


def test_an_unreachable_catalogue_is_no_verdict_exit_2(tmp_path: Path) -> None:
    from support import free_port, write_toml

    from edge_agent.ledger import Ledger
    state = tmp_path / "state"
    Ledger(state / "ledger.sqlite").close()
    cfg = write_toml(tmp_path / "a.toml", {
        "state_dir": str(state),
        "lake": {"kind": "rucio", "rucio": {"url": f"http://127.0.0.1:{free_port()}", "account": "root",
                                            "timeout_seconds": 5,
                                            "auth": {"type": "userpass", "username": "u", "password": "pw"}}},
        "destinations": {"l1": {"kind": "rse", "rse": "L1"}},
        "rules": {"daq": {"directory": str(tmp_path / "buf"), "scope": "s", "destinations": ["l1"], "copies": 1,
                          "dataset_template": "fixed"}}})
    (tmp_path / "buf").mkdir()
    # a ledger row that makes the audit ask the catalogue
    led = Ledger(state / "ledger.sqlite")
    from edge_agent.core.lifecycle import Event, State
    rec = led.discover("daq", b"/x/f", "f", dev=1, inode=1, size=1, mtime_ns=1, priority=0)
    led.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
    led.transition(rec.id, State.COMPLETE, Event.HASHED, scope="s", name="f", dataset="fixed", adler32="00000001")
    led.close()
    r = subprocess.run([sys.executable, "-m", "edge_agent", "-c", str(cfg), "audit"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the audit could not run" in r.stderr and "Traceback" not in r.stderr and "pw" not in r.stderr
