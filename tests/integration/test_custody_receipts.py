"""Custody receipts and GET /custody through the real daemon (issue 16, part 2): a receipt for every
deleted file, matching what the lake holds and the bytes themselves, none for a file still in the
buffer, receipts never taken for data, and /custody answering for every path the ledger knows. On
the embedded local lake, and on the real Rucio lake (Rucio + XRootD on loopback, FTS played by the
test)."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from support import Daemon, adler32_hex

pytestmark = pytest.mark.integration


def custody(d: Daemon, path: str) -> tuple[int, dict[str, Any]]:
    code, body = d.get("/custody?path=" + urllib.parse.quote(path, safe=""))
    return code, json.loads(body) if body else {}


def check_receipt(doc: dict[str, Any], data: bytes, rule: str, relpath: str, rule_dir: Path, copies: int) -> None:
    """What a DAQ reads in a receipt: the file it describes, with the bytes' own checksums."""
    assert doc["schema"] == 1 and doc["status"] == "confirmed" and doc["local_copy"] == "to_delete"
    assert (doc["rule"], doc["relpath"], doc["path"]) == (rule, relpath, str(rule_dir / relpath))
    assert doc["size"] == len(data) and doc["adler32"] == adler32_hex(data)
    assert doc["blake3"] == blake3(data).hexdigest()
    assert doc["copies_required"] == copies and len(doc["replicas"]) >= copies
    assert len({r["location"] for r in doc["replicas"]}) == len(doc["replicas"])
    for r in doc["replicas"]:
        assert (r["size"], r["adler32"], r["state"]) == (len(data), adler32_hex(data), "AVAILABLE"), r
    assert doc["confirmed_at"].endswith("Z") and doc["confirmed_at"] <= doc["written_at"]


def check_custody(d: Daemon, relpath: str, receipt: dict[str, Any]) -> None:
    """/custody says of the path what the receipt says, and that the file is deleted."""
    code, doc = custody(d, relpath)
    assert code == 200, doc
    [f] = [f for f in doc["files"] if f["rule"] == receipt["rule"]]     # a relative path: under every rule
    v = f["versions"][-1]
    assert v["state"] == "deleted" and v["deleted_at"] and v["deleted_at"] >= v["confirmed_at"]
    assert (v["file_id"], v["did"], v["size"], v["adler32"], v["blake3"], v["confirmed_at"]) == (
        receipt["file"]["id"], receipt["did"], receipt["size"], receipt["adler32"], receipt["blake3"],
        receipt["confirmed_at"])
    assert sorted((r["location"], r["url"]) for r in v["replicas"]) == sorted(
        (r["location"], r["url"]) for r in receipt["replicas"])
    assert f["receipt"]["present"] is True and v["receipt"] == f["receipt"]["path"]
    # the same question by absolute path
    [f] = custody(d, receipt["path"])[1]["files"]
    assert f["versions"][-1]["file_id"] == receipt["file"]["id"]


def check_the_rest_is_answered(d: Daemon, quarantined: str, writing: str) -> None:
    code, doc = custody(d, quarantined)
    assert code == 200 and doc["files"]
    for f in doc["files"]:
        assert f["versions"][-1]["state"] == "quarantined" and f["versions"][-1]["reason"]
        assert f.get("receipt", {}).get("present") is not True
    assert custody(d, writing)[0] == 404             # never taken: a name still being written
    assert custody(d, "no/such/file.fits")[0] == 404
    assert d.get("/custody")[0] == 400


# ---------------------------------------------------------------- the embedded local lake

def test_receipts_on_the_local_lake(agent) -> None:
    d: Daemon = agent(rules={
        "beside": {"completion": ["renamed"], "receipts": "beside"},
        "inbox": {"completion": ["renamed"], "receipts": "directory"},
    })
    receipts_dir = d.base / "receipts" / "inbox"
    d.doc["rules"]["inbox"]["receipts_directory"] = str(receipts_dir)
    from support import write_toml
    write_toml(d.config, d.doc)
    d.start()
    written: dict[tuple[str, str], bytes] = {}
    for rule in ("beside", "inbox"):
        for i, rel in enumerate(("a.fits", "run1/b.fits", "run1/deep/c.fits")):
            data = os.urandom(50_000 + i)
            p = d.rule_dir(rule) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            (p.parent / (p.name + ".part")).write_bytes(data)
            os.rename(p.parent / (p.name + ".part"), p)
            written[(rule, rel)] = data
        (d.rule_dir(rule) / "empty.fits").write_bytes(b"")                  # quarantined
        (d.rule_dir(rule) / "never.fits.part").write_bytes(b"still writing")  # never complete
    for rule in ("beside", "inbox"):
        d.wait_for(lambda rule=rule: d.counts(rule).get("deleted") == 3 and d.counts(rule).get("quarantined") == 1,
                   60, f"3 deleted and 1 quarantined in {rule}")
    time.sleep(4)                   # a rescan or two: a receipt taken for data would show up now
    lakes = d.lake_files()
    for (rule, rel), data in written.items():
        where = (d.rule_dir(rule) / (rel + ".receipt")) if rule == "beside" else receipts_dir / (rel + ".receipt")
        assert not (d.rule_dir(rule) / rel).exists()
        doc = json.loads(where.read_bytes())
        check_receipt(doc, data, rule, rel, d.rule_dir(rule), 2)
        name = doc["did"].split(":", 1)[1]
        assert {r["location"] for r in doc["replicas"]} == {"lake1", "lake2"}
        for r in doc["replicas"]:       # the copy the receipt names holds these very bytes
            assert Path(r["url"]).read_bytes() == data == lakes[r["location"]][f"test/{name}"]
        check_custody(d, rel, doc)
    for rule in ("beside", "inbox"):
        assert d.counts(rule) == {"deleted": 3, "quarantined": 1}     # nothing else taken: no receipt as data
    check_the_rest_is_answered(d, "empty.fits", "never.fits.part")
    # receipts only for the deleted files: none for what is still in the buffer
    assert sorted(str(p.relative_to(d.rule_dir("beside"))) for p in d.rule_dir("beside").rglob("*.receipt")) == [
        "a.fits.receipt", "run1/b.fits.receipt", "run1/deep/c.fits.receipt"]
    assert sorted(str(p.relative_to(receipts_dir)) for p in receipts_dir.rglob("*") if p.is_file()) == [
        "a.fits.receipt", "run1/b.fits.receipt", "run1/deep/c.fits.receipt"]
    assert not list(d.rule_dir("inbox").rglob("*.receipt"))
    cli = d.cli("custody", "run1/b.fits")
    assert cli.returncode == 0 and {f["rule"] for f in json.loads(cli.stdout)["files"]} == {"beside", "inbox"}
    assert d.stop() == 0


def test_kill9_between_the_receipt_and_the_unlink_leaves_both_and_the_restart_deletes(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["renamed"], "receipts": "beside"}},
                      env={"EDGE_AGENT_FAILPOINTS": "after_receipt"})
    data = os.urandom(100_000)
    (d.rule_dir() / "k.fits").write_bytes(data)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) == 137, "the failpoint was not reached"
    receipt = d.rule_dir() / "k.fits.receipt"
    first = receipt.read_bytes()
    doc = json.loads(first)
    # the crash's window: the file and its receipt, which says "safe in the lake", not "deleted"
    assert (d.rule_dir() / "k.fits").read_bytes() == data
    assert doc["status"] == "confirmed" and doc["local_copy"] == "to_delete"
    d.env = {}
    d.start()
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "the deletion after the restart")
    assert not (d.rule_dir() / "k.fits").exists()
    assert receipt.read_bytes() == first                  # nothing new to write: the same receipt
    check_receipt(doc, data, "daq", "k.fits", d.rule_dir(), 2)
    check_custody(d, "k.fits", doc)
    assert d.stop() == 0


# ---------------------------------------------------------------- the real Rucio lake

@pytest.mark.lake
@pytest.mark.rucio_server
def test_receipts_on_the_rucio_lake_match_what_rucio_lists(agent, lake) -> None:
    from .test_rucio_lake import FtsPlayer, rucio_agent, uid, write_files
    u = uid()
    d = rucio_agent(agent, lake, {"daq": {"copies": 2, "rse_expression": "lake=true", "receipts": "beside",
                                          "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night"}})
    d.start()
    files = write_files(d, 5)
    (d.rule_dir() / "empty.fits").write_bytes(b"")                      # quarantined: stays in the buffer
    (d.rule_dir() / "late.fits.part").write_bytes(b"a writer still at it")
    names = {f"{u}.{k}": v for k, v in files.items()}
    d.wait_for(lambda: d.counts().get("transferred") == 5, 60, "5 uploads with their rules")
    time.sleep(3)
    # one copy of two in the lake: nothing is confirmed, so no receipt anywhere
    assert d.counts().get("deleted") is None and not list(d.rule_dir().rglob("*.receipt"))
    fts = FtsPlayer(lake, list(names), lake.lake_rses)
    fts.go.set()
    fts.start()
    d.wait_for(lambda: d.counts().get("deleted") == 5, 90, "all deleted once both copies are confirmed")
    fts.stop.set()
    assert fts.error is None, fts.error
    time.sleep(4)                   # a rescan: the receipts in the watched tree are never data
    assert d.counts() == {"deleted": 5, "quarantined": 1}
    for fname, data in files.items():
        assert not (d.rule_dir() / fname).exists()
        doc = json.loads((d.rule_dir() / (fname + ".receipt")).read_bytes())
        check_receipt(doc, data, "daq", fname, d.rule_dir(), 2)
        assert doc["did"] == f"{lake.scope}:{u}.{fname}" and doc["dataset"] == f"{lake.scope}:{u}.night"
        info = lake.replicas(lake.scope, f"{u}.{fname}")
        # what Rucio lists: the same size and adler32, AVAILABLE on every RSE the receipt names
        assert (info["bytes"], info["adler32"]) == (doc["size"], doc["adler32"])
        assert {r["location"] for r in doc["replicas"]} == set(lake.lake_rses)
        for r in doc["replicas"]:
            assert info["states"][r["location"]] == "AVAILABLE"
            # the storage behind the URL holds the very bytes
            assert lake.local_path(r["url"]).read_bytes() == data
        check_custody(d, fname, doc)
    # none for what is still in the buffer
    assert sorted(p.name for p in d.rule_dir().glob("*.receipt")) == sorted(f + ".receipt" for f in files)
    assert (d.rule_dir() / "empty.fits").exists() and (d.rule_dir() / "late.fits.part").exists()
    check_the_rest_is_answered(d, "empty.fits", "late.fits.part")
    assert d.stop() == 0
