"""`edge-agent audit` and the access API against the real lake (Rucio 41 + XRootD 5.5.3).

A night is moved by the real agent (FTS played by the test), audited clean, then broken the ways
an incident breaks it: a replica's file removed from XRootD's disk, a replica's bytes changed on
the storage, a DID registered in Rucio with no file behind it, an unknown file in the buffer.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from integration.test_rucio_lake import FtsPlayer, rucio_agent, uid, write_files
from support import ROOT_CLIENTS, buffer_names, require_xrootd_bindings

from edge_agent.access import ChecksumMismatch, Lake

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]


@pytest.fixture(autouse=True)
def _structlog_as_it_was():  # type: ignore[no-untyped-def]
    """Lake() sets structlog up (warnings only) when nobody did; other tests expect the defaults."""
    yield
    import structlog
    structlog.reset_defaults()


def audit_json(d, *args: str) -> tuple[int, dict]:
    r = d.cli("audit", "--json", *args)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def corrupt_on_storage(lake, rse: str, did_name: str) -> None:
    """Flip one byte of a replica on XRootD's disk, keeping its size. Its mtime moves to another
    second: XRootD caches checksums per whole-second mtime (a real bit flip would keep the mtime
    and be seen only by --deep; that is what --deep is for)."""
    path = lake.local_path(lake.pfn(rse, lake.scope, did_name))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, (st.st_atime, st.st_mtime - 100))


def test_audit_a_clean_night_then_every_kind_of_damage(agent, lake, monkeypatch: pytest.MonkeyPatch) -> None:
    u = uid()
    d = rucio_agent(agent, lake, {"daq": {"copies": 2, "rse_expression": "lake=true",
                                          "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night"}})
    d.start()
    files = write_files(d, 3, size=40_000)
    names = sorted(f"{u}.{k}" for k in files)
    fts = FtsPlayer(lake, names, lake.lake_rses)
    fts.go.set()
    fts.start()
    d.wait_for(lambda: d.counts().get("deleted") == 3, 120, "3 files confirmed on 2 RSEs and deleted")
    fts.stop.set()
    assert fts.error is None, fts.error
    dataset = f"{lake.scope}:{u}.night"

    rc, doc = audit_json(d, "--dataset", dataset)
    assert rc == 0, doc
    assert sorted(f["did"] for f in doc["files"]["ok"]) == [f"{lake.scope}:{n}" for n in names]
    assert all(sorted(f["good_copies"]) == sorted(lake.lake_rses) for f in doc["files"]["ok"])
    r = d.cli("audit")
    assert r.returncode == 0 and "ALL WELL" in r.stdout, r.stdout + r.stderr
    assert d.stop() == 0

    # the damage
    lost, flipped, fine = names
    lake.local_path(lake.pfn(lake.lake_rses[0], lake.scope, lost)).unlink()
    corrupt_on_storage(lake, lake.lake_rses[1], flipped)
    ghost = f"{u}.ghost.fits"
    lake.call("POST", "/replicas", {"rse": lake.lake_rses[0], "files": [
        {"scope": lake.scope, "name": ghost, "bytes": 1234, "adler32": "0badf00d"}]})
    lake.call("POST", f"/dids/{lake.scope}/{u}.night/dids", {"dids": [{"scope": lake.scope, "name": ghost}]})
    stray = d.rule_dir() / "stray.fits"
    stray.write_bytes(b"s" * 500)
    old = time.time() - 3600
    os.utime(stray, (old, old))

    for args in ((), ("--dataset", dataset), ("--deep",)):
        rc, doc = audit_json(d, *args)
        assert rc == 1 and doc["ok"] is False, (args, doc)
        got = {k: sorted(f.get("did") for f in v) for k, v in doc["files"].items() if v}
        assert got == {"missing_replica": [f"{lake.scope}:{lost}"],
                       "checksum_mismatch": [f"{lake.scope}:{flipped}"],
                       "registered_without_file": [f"{lake.scope}:{ghost}"],
                       "unknown_in_buffer": [str(stray)],
                       "ok": [f"{lake.scope}:{fine}"]}, (args, got)
        miss = doc["files"]["missing_replica"][0]["findings"]
        assert any(x["location"] == lake.lake_rses[0] and "holds nothing" in x["detail"] for x in miss)
        bad = doc["files"]["checksum_mismatch"][0]["findings"]
        assert any(x["location"] == lake.lake_rses[1] and x["verdict"] == "checksum_mismatch" for x in bad)

    r = d.cli("audit")
    assert r.returncode == 1
    assert "PROBLEMS: 4 of 5 files need attention" in r.stdout, r.stdout
    for heading, what in (("CHECKSUM MISMATCH", flipped), ("REGISTERED WITHOUT A FILE", ghost),
                          ("MISSING REPLICA", lost), ("UNKNOWN IN THE BUFFER", "stray.fits")):
        assert what in r.stdout.split(heading, 1)[1].split("\n\n", 1)[0], (heading, r.stdout)
    assert "secret" not in r.stdout + r.stderr     # the Rucio password is never printed

    # the access API: a corrupt replica raises, a missing one is skipped for the next
    with Lake.from_config(d.config) as lk:
        assert [f.did for f in lk.list_files(dataset)] == sorted(f"{lake.scope}:{n}" for n in [*names, ghost])
        with pytest.raises(ChecksumMismatch, match=lake.lake_rses[1]):
            lk.read_bytes(f"{lake.scope}:{flipped}", rse=lake.lake_rses[1])
        assert lk.read_bytes(f"{lake.scope}:{lost}") == files[lost.split(".", 1)[1]]
        assert lk.verify(f"{lake.scope}:{fine}") in lake.lake_rses
    # the same over root://, through each client the config may name (lake.rucio.root_client):
    # the corrupt copy raises, a good one reads
    for root_client in ROOT_CLIENTS:
        if root_client == "bindings":
            require_xrootd_bindings()
        monkeypatch.setenv("EDGE_AGENT_LAKE__RUCIO__ROOT_CLIENT", root_client)
        with Lake.from_config(d.config, schemes=("root",)) as lk:
            assert lk.reader.root_client == root_client
            with pytest.raises(ChecksumMismatch, match=f"{lake.lake_rses[1]} \\(root://"):
                lk.read_bytes(f"{lake.scope}:{flipped}", rse=lake.lake_rses[1])
            assert lk.read_bytes(f"{lake.scope}:{fine}") == files[fine.split(".", 1)[1]]
    with Lake.connect(lake.url, lake.account, username=lake.env["EDGE_LAKE_RUCIO_USERNAME"],
                      password=lake.env["EDGE_LAKE_RUCIO_PASSWORD"]) as lk:
        assert lk.read_bytes(f"{lake.scope}:{fine}") == files[fine.split(".", 1)[1]]


def test_register_in_place_the_released_buffer_copy_is_no_false_alarm(agent, lake) -> None:
    """The buffer RSE's replica of a deleted file is tombstoned and its bytes are gone: expected."""
    u = uid()
    bufdir = lake.data_dir / "data" / "buf" / u
    bufdir.mkdir(parents=True)
    os.chmod(bufdir, 0o755)
    d = rucio_agent(agent, lake, {"daq": {
        "directory": str(bufdir), "inject": "register", "buffer_rse": lake.buf_rse,
        "buffer_url": f"{lake.root_url}//data/buf/{u}/", "copies": 2, "rse_expression": "lake=true",
        "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night",
        "uplink_once": False}}, destinations={})     # FtsPlayer plays no judge-repairer
    d.start()
    files = write_files(d, 2, size=30_000)
    names = sorted(f"{u}.{k}" for k in files)
    d.wait_for(lambda: d.counts().get("transferred") == 2, 60, "2 registered in place with rules")
    # while the lake has not copied yet: in flight, not a problem; the buffer copy does not count
    rc, doc = audit_json(d)
    assert rc == 0 and doc["counts"]["in_flight"] == 2, doc
    fts = FtsPlayer(lake, names, lake.lake_rses)
    fts.go.set()
    fts.start()
    d.wait_for(lambda: d.counts().get("deleted") == 2, 90, "buffer files deleted after both copies")
    fts.stop.set()
    assert fts.error is None, fts.error
    assert buffer_names(bufdir) == []
    rc, doc = audit_json(d)
    assert rc == 0 and doc["counts"]["ok"] == 2, doc
    assert all(sorted(f["good_copies"]) == sorted(lake.lake_rses) for f in doc["files"]["ok"])
    assert d.stop() == 0
