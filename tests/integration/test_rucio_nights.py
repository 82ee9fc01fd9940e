"""Night close-out against the real lake (Rucio 41 + XRootD on loopback, scripts/lake): a night
written with an mtime in the past (its rollover and grace period over), delivered, closed in Rucio
with its manifest DID readable through the access API and matching what the lake holds; the verdict
incomplete for a quarantined (zero-byte) file; a late file in a dataset of its own, closed too."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import pytest

from edge_agent.access import Lake
from edge_agent.core.policy import night_of

from .test_rucio_lake import rucio_agent, uid

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]
DAY = 86400.0


def write_at(d: Any, name: str, data: bytes, mtime: float) -> None:
    """A DAQ file written then renamed into place, with its mtime set back (its night is over)."""
    tmp = d.rule_dir() / f"{name}.part"
    tmp.write_bytes(data)
    os.utime(tmp, (mtime, mtime))
    os.rename(tmp, d.rule_dir() / name)


def nights(d: Any) -> dict[str, dict[str, Any]]:
    r = d.cli("nights", "--json")
    assert r.returncode in (0, 1), r.stderr
    return {n["dataset"]: n for n in json.loads(r.stdout)}


def test_a_night_is_closed_in_rucio_with_a_manifest_and_a_late_file_goes_to_its_own_dataset(agent, lake) -> None:
    u = uid()
    d = rucio_agent(agent, lake, {"daq": {"copies": 1, "rse_expression": lake.lake_rses[0],
                                          "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.{{night}}",
                                          "close_nights": True, "night_grace_hours": 0,
                                          "night_deadline_hours": 0}},
                    nights_check_seconds=2)
    mtime = time.time() - 3 * DAY
    ds = f"{u}.{night_of(mtime, 12, dt.UTC)}"
    files = {f"f{i}.fits": os.urandom(40_000 + i) for i in range(4)}
    for name, data in files.items():
        write_at(d, name, data, mtime)
    write_at(d, "empty.fits", b"", mtime)          # quarantined: a zero-byte file without allow_empty
    d.start()
    d.wait_for(lambda: nights(d).get(ds, {}).get("state") == "closed", 120, "the night closed")
    night = nights(d)[ds]
    assert d.counts().get("deleted") == 4 and d.counts().get("quarantined") == 1
    assert night["verdict"] == "incomplete" and night["files"] == 5
    assert len(night["reasons"]) == 1 and night["reasons"][0].startswith("empty.fits: quarantined: zero-byte file")
    manifest = f"{ds}.manifest.json"
    assert night["manifest"] == f"{lake.scope}:{manifest}"

    # Rucio: the dataset is closed and holds the night's files and its manifest
    assert lake.call("GET", f"/dids/{lake.scope}/{ds}").json()["open"] is False
    held = {x["name"]: x for x in lake.lines(lake.call("GET", f"/dids/{lake.scope}/{ds}/dids"))}
    assert sorted(held) == sorted([*(f"{u}.{n}" for n in files), manifest])

    # the manifest, read through the access API (verified against Rucio's size and adler32), says
    # what the lake holds: every file's DID, size, adler32, its replica, and the quarantined one
    with Lake.from_config(d.config) as lk:
        doc = json.loads(lk.read_bytes(f"{lake.scope}:{manifest}"))
        listed = {f.did: f for f in lk.list_files(f"{lake.scope}:{ds}")}
    assert doc["verdict"] == "incomplete" and doc["dataset"] == ds and doc["reasons"] == night["reasons"]
    entries = {e["path"]: e for e in doc["entries"]}
    assert sorted(entries) == sorted([*files, "empty.fits"])
    assert entries["empty.fits"]["state"] == "quarantined" and "zero-byte" in entries["empty.fits"]["reason"]
    for name, data in files.items():
        e = entries[name]
        info = lake.replicas(lake.scope, f"{u}.{name}")
        assert e["did"] == f"{lake.scope}:{u}.{name}" and e["state"] == "deleted" and e["confirmed_at"]
        assert (e["size"], e["adler32"]) == (len(data), info["adler32"]) == (listed[e["did"]].bytes, listed[e["did"]].adler32)
        assert [r["location"] for r in e["replicas"]] == [lake.lake_rses[0]]
        assert info["states"][lake.lake_rses[0]] == "AVAILABLE"

    # a file of that night arriving now goes to <dataset>.late, is reported, and is closed in turn
    write_at(d, "late.fits", b"L" * 1234, mtime)
    late = f"{ds}.late"
    d.wait_for(lambda: nights(d).get(late, {}).get("state") == "closed", 120, "the late dataset closed")
    assert nights(d)[late]["late_of"] == ds and nights(d)[late]["verdict"] == "complete"
    assert lake.call("GET", f"/dids/{lake.scope}/{late}").json()["open"] is False
    assert sorted(x["name"] for x in lake.lines(lake.call("GET", f"/dids/{lake.scope}/{late}/dids"))) == sorted(
        [f"{u}.late.fits", f"{late}.manifest.json"])
    assert f"{u}.late.fits" not in {x["name"] for x in lake.lines(lake.call("GET", f"/dids/{lake.scope}/{ds}/dids"))}
    assert any(e.get("event") == "late file: its night is closed, it goes to a dataset of its own"
               and e.get("dataset") == late for e in d.events())
    # /status and the metrics show them
    shown = {n["dataset"]: n for n in d.status()["nights"]}
    assert shown[ds]["verdict"] == "incomplete" and shown[late]["verdict"] == "complete"
    metrics = d.get("/metrics")[1].decode()
    assert 'edge_agent_nights_closed{rule="daq",verdict="incomplete"} 1.0' in metrics
    assert 'edge_agent_night_late_files{rule="daq"} 1.0' in metrics
    assert 'edge_agent_nights_overdue{rule="daq"} 0.0' in metrics
    assert d.stop() == 0
