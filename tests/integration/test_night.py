"""A night of DAQ files through the real daemon on the embedded default lake."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import Daemon, adler32_hex

from edge_agent.localfs import is_agent_temp

pytestmark = pytest.mark.integration


def slow_write(path: Path, data: bytes, pieces: int = 5, pause: float = 0.4) -> None:
    with open(path, "wb") as fh:
        step = len(data) // pieces + 1
        for k in range(0, len(data), step):
            fh.write(data[k:k + step])
            fh.flush()
            time.sleep(pause)


def test_every_completion_style_is_copied_twice_confirmed_and_deleted(agent) -> None:
    d: Daemon = agent(rules={
        "slow": {"completion": ["closed", "stable"], "stable_seconds": 1},
        "renamed": {"completion": ["renamed"]},
        "marker": {"completion": ["marker"]},
        "sidecar": {"completion": ["sidecar"], "metadata": {"instrument": "cam"}},
    })
    d.start()
    rng = random.Random(7)
    originals: dict[str, bytes] = {}

    def daq() -> None:
        for i in range(3):
            data = rng.randbytes(rng.randint(100_000, 900_000))
            p = d.rule_dir("slow") / f"run{i}" / f"s{i}.fits"
            p.parent.mkdir(exist_ok=True)
            originals[f"run{i}/s{i}.fits"] = data
            slow_write(p, data)

    writer = threading.Thread(target=daq)
    writer.start()
    for i in range(3):
        data = rng.randbytes(rng.randint(1000, 500_000))
        tmp = d.rule_dir("renamed") / f"r{i}.fits.part"
        tmp.write_bytes(data)
        time.sleep(0.3)  # long enough for several ticks: a .part file must never be taken
        os.rename(tmp, d.rule_dir("renamed") / f"r{i}.fits")
        originals[f"r{i}.fits"] = data
    for i in range(3):
        data = rng.randbytes(rng.randint(1000, 500_000))
        (d.rule_dir("marker") / f"m{i}.fits").write_bytes(data)
        originals[f"m{i}.fits"] = data
    for i in range(3):
        data = rng.randbytes(rng.randint(1000, 500_000))
        (d.rule_dir("sidecar") / f"c{i}.fits").write_bytes(data)
        originals[f"c{i}.fits"] = data
    time.sleep(2.5)
    # without their markers/sidecars nothing of those two rules may have moved
    assert (d.rule_dir("marker") / "m0.fits").exists()
    assert d.counts("marker").get("discovered") == 3
    for i in range(3):
        (d.rule_dir("marker") / f"m{i}.fits.done").touch()
        (d.rule_dir("sidecar") / f"c{i}.fits.json").write_text(json.dumps({"run": i, "night": "n1"}))
    writer.join()

    d.wait_for(lambda: all(d.counts(r).get("deleted") == 3 for r in ("slow", "renamed", "marker", "sidecar")),
               90, "all 12 files deleted")
    # nothing left in the buffer: data, markers and sidecars are gone
    assert [p for p in d.buffer.rglob("*") if p.is_file() and not is_agent_temp(p.name)] == []   # but its lock
    lakes = d.lake_files()
    for lake in ("lake1", "lake2"):
        got = {Path(k).name: v for k, v in lakes[lake].items()}
        assert len(lakes[lake]) == 12
        for rel, data in originals.items():
            assert got[Path(rel).name] == data, f"{lake}: {rel} differs"
    # the sidecar's JSON became the file's metadata, merged over the rule's
    rec = [f for f in d.files() if f["relpath"] == "c1.fits"][0]
    assert rec["metadata"] == {"instrument": "cam", "run": 1, "night": "n1"}
    assert rec["adler32"] == adler32_hex(originals["c1.fits"])
    # the local lake catalogue knows every DID with its checksum and both replicas
    cat = sqlite3.connect(d.state / "lake-catalog.sqlite")
    n_files, n_reps = cat.execute("SELECT (SELECT COUNT(*) FROM dids WHERE type='FILE'), "
                                  "(SELECT COUNT(*) FROM replicas)").fetchone()
    assert (n_files, n_reps) == (12, 24)
    # each deletion was logged with its evidence: two replicas whose adler32 equals the local one
    deletions = [e for e in d.events() if e.get("event") == "deleted"]
    assert len(deletions) == 12
    for e in deletions:
        assert len(e["replicas"]) == 2 and all(r["adler32"] == e["local_adler32"] for r in e["replicas"])
    assert d.stop() == 0


def test_status_metrics_and_cli_report_what_happened(agent) -> None:
    d: Daemon = agent()
    d.start()
    (d.rule_dir() / "a.fits").write_bytes(b"x" * 5000)
    (d.rule_dir() / "empty.fits").write_bytes(b"")
    os.symlink("/etc/hostname", d.rule_dir() / "link.fits")
    d.wait_for(lambda: d.counts().get("deleted") == 1 and d.counts().get("quarantined") == 1, 30,
               "one deleted, one quarantined")
    doc = d.status()
    assert doc["ready"] is True
    assert doc["rules"]["daq"]["states"]["deleted"] == {"files": 1, "bytes": 5000}
    assert doc["rules"]["daq"]["disk"]["level"] in ("ok", "warning", "critical")
    assert any("zero-byte" in (e["reason"] or "") for e in doc["recent_errors"])
    assert any("symlink" in n["detail"] for n in doc["notices"])
    assert doc["oldest_unconfirmed"] is None        # the quarantined file is listed apart
    assert [q["path"] for q in doc["quarantined"]] == ["empty.fits"]
    assert d.get("/healthz")[0] == 200 and d.get("/readyz")[0] == 200

    code, body = d.get("/metrics")
    assert code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    assert samples[("edge_agent_files", (("rule", "daq"), ("state", "deleted")))] == 1
    assert samples[("edge_agent_files", (("rule", "daq"), ("state", "quarantined")))] == 1
    assert samples[("edge_agent_sent_bytes_total", (("destination", "lake1"), ("rule", "daq")))] == 5000
    assert samples[("edge_agent_lake_up", ())] == 1

    # read-only: nothing but GET/HEAD
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{d.port}/status", data=b"{}", method="POST")
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("POST accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 405

    out = d.cli("status").stdout
    assert "READY" in out and "daq" in out and "zero-byte" in out
    hist = d.cli("files", "a.fits").stdout
    for step in ("discovered", "completed", "hashed", "registered", "copy_written", "transferred",
                 "confirmed", "deleted"):
        assert step in hist
    scan = d.cli("scan", "--dry-run").stdout
    assert "link.fits: REPORTED: symlink" in scan and "empty.fits: in ledger" in scan
    assert d.stop() == 0
    # with the daemon down, `status` still answers from the ledger
    out = d.cli("status").stdout
    assert "does not answer" in out and "quarantined" in out


def test_file_modified_after_hashing_is_not_deleted_and_its_new_version_goes_through(agent) -> None:
    # 1 MB/s: the 3 MB copy takes seconds, long enough to change the file under it
    d: Daemon = agent(bandwidth_mbps=1.0, rules={"daq": {"completion": ["renamed"]}})
    d.start()
    p = d.rule_dir() / "frame.fits"
    old = os.urandom(3_000_000)
    p.write_bytes(old)
    d.wait_for(lambda: any(f["state"] == "registered" for f in d.files()), 30, "the copy to start")
    time.sleep(0.5)
    new = os.urandom(2_000_000)
    with open(p, "r+b") as fh:      # rewritten in place: same inode
        fh.write(new)
        fh.truncate()
    d.wait_for(lambda: d.counts().get("deleted") == 1, 60, "the new version deleted")
    recs = sorted(d.files(), key=lambda f: f["version"])
    assert [r["state"] for r in recs] == ["superseded", "deleted"]
    assert recs[0]["adler32"] == adler32_hex(old) and recs[1]["adler32"] == adler32_hex(new)
    assert "changed" in recs[0]["reason"]
    # whatever the lake holds under the old name is never the new data claimed as old, and the
    # new version's copies hold exactly the new bytes
    for lake in d.lake_files().values():
        assert new in lake.values()
        assert all(v in (old, new) for v in lake.values())
    assert not p.exists()


def test_unreadable_file_is_quarantined_with_its_reason_and_retry_sends_it_on(agent) -> None:
    d: Daemon = agent(unprivileged=True)
    d.start()
    p = d.rule_dir() / "secret.fits"
    p.write_bytes(b"data" * 1000)
    os.chmod(p, 0o000)
    d.wait_for(lambda: d.counts().get("quarantined") == 1, 30, "the unreadable file quarantined")
    rec = d.files()[0]
    assert "cannot read" in rec["reason"] and "Permission denied" in rec["reason"]
    assert p.exists()
    os.chmod(p, 0o644)
    out = d.cli("retry", str(rec["id"]))
    assert out.returncode == 0, out.stderr
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "the file to go through after retry")
    assert not p.exists()


def test_the_status_page_shows_the_rules_and_escapes_what_it_shows(agent) -> None:
    d: Daemon = agent()
    d.start()
    (d.rule_dir() / "<b>x&y.fits").write_bytes(b"")            # a hostile name, quarantined (zero bytes)
    d.wait_for(lambda: d.counts().get("quarantined") == 1, 30, "quarantine")
    code, body = d.get("/")
    page = body.decode()
    assert code == 200 and "<th>daq</th>" in page and "quarantined" in page
    assert "&lt;b&gt;x&amp;y.fits" in page and "<b>x&y.fits" not in page
