"""The agent and an S3 RSE for real: Ceph radosgw 16.2 behind TLS (self-signed, verified with its own
CA file), registered in Rucio 41.5.1 with sign_url=s3; every S3 request on a URL Rucio signed.
Started by scripts/lake/s3-start.sh through the s3_lake fixture."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import zlib
from pathlib import Path

import blake3
import httpx
import pytest
from support import adler32_hex, buffer_names

from edge_agent.access import Lake
from edge_agent.errors import ChecksumMismatch, RetryableError
from edge_agent.lake.rucio_client import RucioClient
from edge_agent.lake.signed_reads import SignedReadResolver
from edge_agent.settings import RucioSettings
from edge_agent.transfer.base import Expected
from edge_agent.transfer.s3 import S3Transport

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]


def uid() -> str:
    return "s" + uuid.uuid4().hex[:10]


def client(lake) -> RucioClient:  # type: ignore[no-untyped-def]
    cfg = lake.agent_lake_config()["rucio"]
    return RucioClient(RucioSettings(**cfg))


def write_files(directory: Path, n: int, size: int = 200_000) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        data = os.urandom(size + 7 * i)
        tmp = directory / f"f{i:03d}.fits.part"
        tmp.write_bytes(data)
        os.rename(tmp, directory / f"f{i:03d}.fits")
        out[f"f{i:03d}.fits"] = data
    return out


def test_a_night_to_s3_and_xrootd_is_deleted_only_after_both_copies_verify(agent, lake, s3_lake) -> None:
    u = uid()
    dests = {"s3": s3_lake.destination(), "lake1": {"kind": "rse", "rse": lake.lake_rses[0], "scheme": "http"}}
    d = agent(rules={"daq": {"scope": lake.scope, "completion": ["renamed"], "destinations": ["s3", "lake1"],
                             "copies": 2, "md5": True, "name_template": f"{u}.{{filename}}",
                             "dataset_template": f"{u}.night"}},
              destinations=dests, lake=lake.agent_lake_config())
    d.start()
    files = write_files(d.rule_dir(), 6)
    names = {f"{u}.{k}": v for k, v in files.items()}
    d.wait_for(lambda: d.counts().get("deleted") == 6, 120, "6 files in S3 and XRootD, then deleted")
    assert buffer_names(d.rule_dir()) == []
    for name, data in names.items():
        info = lake.replicas(lake.scope, name)
        assert info["bytes"] == len(data) and info["adler32"] == adler32_hex(data)
        assert info["md5"] == hashlib.md5(data).hexdigest()
        assert info["states"] == {s3_lake.rse: "AVAILABLE", lake.lake_rses[0]: "AVAILABLE"}, info["states"]
        r = s3_lake.get(s3_lake.pfn(lake.scope, name))     # the object, read through a signed URL
        assert r.status_code == 200 and r.content == data
        assert r.headers["ETag"].strip('"') == hashlib.md5(data).hexdigest()
    for e in (e for e in d.events() if e.get("event") == "deleted"):
        where = {r["location"] for r in e["replicas"]}
        assert where == {s3_lake.rse, lake.lake_rses[0]}, e
        assert all(r["adler32"] == e["local_adler32"] for r in e["replicas"])
    assert d.stop() == 0

    # the audit sees the same: every S3 copy checked by size and ETag (no adler32 in S3), or read
    # through a signed URL with --deep; the XRootD copy by its adler32
    for args in ((), ("--deep",)):
        r = d.cli("audit", "--json", "--dataset", f"{lake.scope}:{u}.night", *args)
        assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-2000:])
        doc = json.loads(r.stdout)
        assert doc["counts"]["ok"] == 6, (args, doc["counts"])
        assert all(sorted(f["good_copies"]) == sorted([s3_lake.rse, lake.lake_rses[0]]) for f in doc["files"]["ok"])

    # A compute platform reads the night back from S3 with the agent's config and nothing else:
    # the access API signs through Rucio, trusts the gateway's CA from the destination, verifies adler32.
    first, data = next(iter(names.items()))
    with Lake.from_config(d.config) as analysis:
        assert {f.name for f in analysis.list_files(f"{lake.scope}:{u}.night")} == set(names)
        assert analysis.read_bytes(f"{lake.scope}:{first}", rse=s3_lake.rse) == data
        s3_lake.put(s3_lake.pfn(lake.scope, first), b"X" + data[1:])        # the bucket's copy rots
        with pytest.raises(ChecksumMismatch):
            analysis.read_bytes(f"{lake.scope}:{first}", rse=s3_lake.rse)
        assert analysis.read_bytes(f"{lake.scope}:{first}", rse=lake.lake_rses[0]) == data


def test_an_s3_copy_whose_etag_does_not_match_is_not_counted(agent, lake, s3_lake) -> None:
    # The agent writes XRootD; the lake (played here) makes the S3 copy, first with other bytes.
    u = uid()
    dests = {"lake1": {"kind": "rse", "rse": lake.lake_rses[0], "scheme": "http"},
             "s3": s3_lake.destination()}      # not written by the rule: known so that it is verified
    d = agent(rules={"daq": {"scope": lake.scope, "completion": ["renamed"], "destinations": ["lake1"],
                             "copies": 2, "md5": True, "rse_expression": f"{lake.lake_rses[0]}|{s3_lake.rse}",
                             "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night"}},
              destinations=dests, lake=lake.agent_lake_config())
    d.start()
    files = write_files(d.rule_dir(), 1, size=300_000)
    (fname, data), = files.items()
    name = f"{u}.{fname}"
    d.wait_for(lambda: d.counts().get("transferred") == 1, 60, "uploaded to XRootD, copies asked for")
    d.wait_for(lambda: lake.replicas(lake.scope, name)["states"].get(s3_lake.rse) == "COPYING", 30,
               "Rucio waits for the S3 copy")
    pfn = s3_lake.pfn(lake.scope, name)
    wrong = bytes(b ^ 0xFF for b in data[:10]) + data[10:]          # same size, other bytes
    s3_lake.put(pfn, wrong)
    lake.call("PUT", "/replicas", {"rse": s3_lake.rse, "files": [{"scope": lake.scope, "name": name, "state": "A"}]})
    d.wait_for(lambda: any("ETag" in (f.get("reason") or "") for f in d.files()), 60,
               "the S3 copy reported as not matching")
    time.sleep(3)
    assert d.counts().get("deleted") is None and (d.rule_dir() / fname).exists(), "never counted"
    r = d.cli("audit", "--json")                       # the audit names the bad S3 copy too
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    (bad,) = json.loads(r.stdout)["files"]["checksum_mismatch"]
    assert any(x["location"] == s3_lake.rse and "ETag" in x["detail"] for x in bad["findings"]), bad
    s3_lake.put(pfn, data)                                           # the lake mends its copy
    d.wait_for(lambda: d.counts().get("deleted") == 1, 60, "deleted once the S3 copy verifies")
    assert d.stop() == 0


def test_an_expired_signed_url_is_renewed(lake, s3_lake, tmp_path: Path) -> None:
    c = client(lake)
    asked: list[tuple[str, int]] = []

    def sign(op: str, url: str) -> str:
        # the first write URL lives 1 s and the request is held back 3 s: it reaches the gateway expired
        first_write = op == "write" and not any(o == "write" for o, _ in asked)
        lifetime = 1 if first_write else 600
        asked.append((op, lifetime))
        signed = c.signed_url(s3_lake.rse, op, url, lifetime)
        if first_write:
            time.sleep(3)
        return signed

    data = os.urandom(1 << 20)
    src = tmp_path / "f.fits"
    src.write_bytes(data)
    expected = Expected(len(data), blake3.blake3(data).hexdigest(), adler32_hex(data), hashlib.md5(data).hexdigest())
    pfn = s3_lake.pfn(lake.scope, uid())
    with S3Transport(sign, verify=s3_lake.ca) as t:
        got = t.put(str(src), pfn, expected, lambda n: None)
    assert [op for op, _ in asked] == ["read", "write", "write", "read"], asked
    assert got.md5 == expected.md5 and s3_lake.get(pfn).content == data
    c.close()


def test_a_bad_copy_is_removed_with_a_signed_delete(lake, s3_lake, tmp_path: Path) -> None:
    c = client(lake)
    data = os.urandom(100_000)
    src = tmp_path / "f.fits"
    src.write_bytes(data)
    # hashed "before"; the URL is this version's own (found empty and recorded so, as the pipeline does)
    stale = Expected(len(data), "0" * 64, adler32_hex(data), hashlib.md5(data).hexdigest(), may_replace=True)
    pfn = s3_lake.pfn(lake.scope, uid())
    with S3Transport(lambda op, url: c.signed_url(s3_lake.rse, op, url, 60), verify=s3_lake.ca) as t:
        with pytest.raises(Exception, match="changed since it was hashed"):
            t.put(str(src), pfn, stale, lambda n: None)
        assert t.stat(pfn) is None, "nothing left in the bucket"
    assert s3_lake.get(pfn).status_code == 404
    c.close()


def test_tls_is_verified_against_the_gateways_own_ca(lake, s3_lake, tmp_path: Path) -> None:
    c = client(lake)
    pfn = s3_lake.pfn(lake.scope, uid())
    t = S3Transport(lambda op, url: c.signed_url(s3_lake.rse, op, url, 60))   # the system's CAs only
    with t, pytest.raises(RetryableError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        t.stat(pfn)
    c.close()


def test_the_read_resolver_streams_an_s3_replica_with_its_adler32_verified(lake, s3_lake) -> None:
    name = uid()
    data = os.urandom(2 << 20)
    pfn = s3_lake.pfn(lake.scope, name)
    s3_lake.put(pfn, data)
    adler = adler32_hex(data)
    lake.call("POST", "/replicas", {"rse": s3_lake.rse, "files": [
        {"scope": lake.scope, "name": name, "bytes": len(data), "adler32": adler, "pfn": pfn}]})
    c = client(lake)
    row = c.list_replicas([(lake.scope, name)], schemes=["https"])[0]
    (listed,) = row["rses"][s3_lake.rse]
    url = SignedReadResolver(c, lifetime=60)(s3_lake.rse, listed)
    assert url.startswith(pfn + "?") and "X-Amz-Signature=" in url
    value, size = 1, 0
    with httpx.stream("GET", url, verify=s3_lake.tls, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes(1 << 16):
            value = zlib.adler32(chunk, value)
            size += len(chunk)
    assert size == row["bytes"] and f"{value & 0xFFFFFFFF:08x}" == row["adler32"]
    # a PFN on an XRootD RSE needs no signature: unchanged
    assert SignedReadResolver(c)(lake.lake_rses[0], "http://x/y") == "http://x/y"
    c.close()


def test_the_agents_own_s3_copy_overwritten_is_rewritten_never_counted(agent, lake, s3_lake) -> None:
    # The agent writes S3; the second copy (XRootD) is the lake's, made here by hand once the S3 copy is bad.
    u = uid()
    lake1 = lake.lake_rses[0]
    d = agent(rules={"daq": {"scope": lake.scope, "completion": ["renamed"], "destinations": ["s3"],
                             "copies": 2, "md5": True, "rse_expression": f"{s3_lake.rse}|{lake1}",
                             "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night"}},
              destinations={"s3": s3_lake.destination()}, lake=lake.agent_lake_config())
    d.start()
    (fname, data), = write_files(d.rule_dir(), 1, size=250_000).items()
    name = f"{u}.{fname}"
    d.wait_for(lambda: d.counts().get("transferred") == 1, 60, "uploaded to S3, copies asked for")
    pfn = s3_lake.pfn(lake.scope, name)
    s3_lake.put(pfn, data[::-1])                                     # someone overwrites the object
    d.wait_for(lambda: any("ETag" in (f.get("reason") or "") for f in d.files()), 60, "the bad S3 copy noticed")
    # the lake makes its copy on XRootD: the rule turns OK, but the S3 copy still does not count
    r = httpx.put(lake.pfn(lake1, lake.scope, name), content=data, timeout=60,
                  headers={"Content-Length": str(len(data))})
    assert r.status_code in (200, 201, 204)
    lake.call("PUT", "/replicas", {"rse": lake1, "files": [{"scope": lake.scope, "name": name, "state": "A"}]})
    d.wait_for(lambda: d.counts().get("deleted") == 1, 90, "the S3 copy rewritten by the agent, then deleted")
    assert s3_lake.get(pfn).content == data, "the agent wrote its copy again"
    history = [e for e in d.events() if "failed verification" in str(e.get("reason", ""))]
    assert history, "the rewrite was for a failed verification"
    assert d.stop() == 0


def test_a_file_larger_than_one_signed_put_is_quarantined_with_the_reason(agent, lake, s3_lake) -> None:
    """5 GiB + 1 byte (a sparse file: hashing reads zeros, ~10-30 s) to a rule with an S3 destination:
    quarantined before anything is registered or sent, kept in the buffer, the reason says why."""
    u = uid()
    dests = {"s3": s3_lake.destination(), "lake1": {"kind": "rse", "rse": lake.lake_rses[0], "scheme": "http"}}
    d = agent(rules={"daq": {"scope": lake.scope, "completion": ["renamed"], "destinations": ["s3", "lake1"],
                             "copies": 2, "md5": True, "name_template": f"{u}.{{filename}}",
                             "dataset_template": f"{u}.night"}},
              destinations=dests, lake=lake.agent_lake_config())
    d.start()
    tmp = d.rule_dir() / "huge.fits.part"
    with open(tmp, "wb") as fh:
        fh.truncate((5 << 30) + 1)
    os.rename(tmp, d.rule_dir() / "huge.fits")
    d.wait_for(lambda: d.counts().get("quarantined") == 1, 300, "the 5 GiB + 1 file quarantined")
    (f,) = d.files()
    assert "more than one signed PUT" in f["reason"] and s3_lake.rse in f["reason"], f["reason"]
    assert (d.rule_dir() / "huge.fits").stat().st_size == (5 << 30) + 1, "kept in the buffer"
    assert lake.call("GET", f"/dids/{lake.scope}/{u}.huge.fits", ok=(404,)).status_code == 404, "not registered"
    assert s3_lake.get(s3_lake.pfn(lake.scope, f"{u}.huge.fits")).status_code == 404, "nothing sent"
    assert d.stop() == 0


def test_who_may_sign_urls_is_the_servers_to_say_and_a_refusal_makes_files_wait(lake, s3_lake) -> None:
    """Rucio 38 signs URLs for root only; later releases also for an account with the attribute
    sign-url. An account without the permission gets SigningRefused (retryable: files wait, health
    says why); given the attribute, a later server signs at once, Rucio 38 still refuses."""
    from edge_agent.lake.rucio_client import SigningRefused
    from edge_agent.lake.rucio_server import release
    from lake import recorded_release
    account = f"signer{uuid.uuid4().hex[:8]}"
    lake.call("POST", f"/accounts/{account}", {"type": "USER", "email": f"{account}@example.org"}, ok=(201, 409))
    r = httpx.put(f"{lake.url}/identities/{account}/userpass", timeout=60, headers={
        "X-Rucio-Auth-Token": lake.token(), "X-Rucio-Username": account, "X-Rucio-Password": "signer-secret",
        "X-Rucio-Email": f"{account}@example.org", "X-Rucio-Default": "True"})
    assert r.status_code == 201, r.text
    cfg = lake.agent_lake_config()["rucio"]
    cfg.update(account=account, auth={"type": "userpass", "username": account, "password": "signer-secret"})
    signer = RucioClient(RucioSettings(**cfg))
    pfn = s3_lake.pfn(lake.scope, f"{uid()}.probe")
    try:
        with pytest.raises(SigningRefused, match="sign-url"):
            signer.signed_url(s3_lake.rse, "read", pfn)
        assert account in str(signer.signing_refused[s3_lake.rse][0])
        lake.call("POST", f"/accounts/{account}/attr/sign-url", {"value": "true"}, ok=(201, 409))
        if release(recorded_release(lake.env)) >= (39, 0, 0):     # Rucio's core/permission/generic.py
            assert signer.signed_url(s3_lake.rse, "read", pfn).startswith("https://")
            assert signer.signing_refused == {}
        else:
            with pytest.raises(SigningRefused):
                signer.signed_url(s3_lake.rse, "read", pfn)
    finally:
        signer.close()
