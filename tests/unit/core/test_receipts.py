"""Custody receipts, pure: their names, when they are due, what they say."""

from __future__ import annotations

import json

import pytest

from edge_agent.core import receipts
from edge_agent.core.policy import Replica

V = receipts.Version(file_id=7, version=2, rule="r", relpath="run/f.fits", path=b"/daq/run/f.fits", scope="s",
                     name="run/f.fits.v2", dataset="r.20261207", size=10, mtime_ns=123, adler32="0000abcd",
                     md5=None, blake3="b3", confirmed_at=1_765_000_000.25)
REPLICAS = [Replica("RSE_B", 10, "0000abcd", url="root://b//f"),
            Replica("RSE_A", 10, "0000abcd", url="https://a/f", adler32_from_catalogue=True)]


def doc(**kw: object) -> dict[str, object]:
    args: dict[str, object] = {"v": V, "replicas": REPLICAS, "copies": 2, "local_copy": receipts.TO_DELETE,
                               "written_at": 1_765_000_100.0, "host": "daq01", "agent_id": None,
                               "agent_version": "0.1.0"}
    args.update(kw)
    return receipts.document(**args)  # type: ignore[arg-type]


def test_a_name_gets_the_suffix() -> None:
    assert receipts.receipt_name(b"f1.fits") == b"f1.fits.receipt"
    assert receipts.receipt_name(b"x" * 247) == b"x" * 247 + b".receipt"      # 255 exactly


def test_a_long_name_is_shortened_within_the_limit_and_stays_distinct() -> None:
    a, b = receipts.receipt_name(b"x" * 248), receipts.receipt_name(b"x" * 249)
    assert len(a) <= 255 and len(b) <= 255 and a != b
    assert a.startswith(b"x" * 200 + b".") and a.endswith(b".receipt")
    assert receipts.is_receipt_name(a) and receipts.is_receipt_name("f.receipt")
    assert not receipts.is_receipt_name("f.receipts") and not receipts.is_receipt_name(b"f.fits")


@pytest.mark.parametrize(("verdict", "confirmed", "policy", "dry", "due"), [
    ("delete", 2, "after_confirm", False, True),
    ("gone", 2, "after_confirm", False, True),
    ("gone", 1, "after_confirm", False, False),     # gone, but the lake no longer holds N: not "safe"
    ("wait", 1, "after_confirm", False, False),     # not confirmed
    ("wait", 2, "after_confirm", False, False),     # a writer still has it open
    ("keep", 2, "never", False, True),
    ("wait", 2, "keep", False, True),               # the keep period runs: safe already
    ("wait", 1, "keep", False, False),
    ("keep", 2, "after_confirm", True, True),       # dry run
    ("changed", 2, "after_confirm", False, False),
])
def test_when_a_receipt_is_due(verdict: str, confirmed: int, policy: str, dry: bool, due: bool) -> None:
    assert receipts.due(verdict, confirmed, 2, policy, dry) is due


def test_the_document() -> None:
    d = doc()
    assert d["schema"] == 1 and d["status"] == "confirmed"
    assert (d["did"], d["dataset"], d["relpath"], d["path"]) == ("s:run/f.fits.v2", "s:r.20261207", "run/f.fits",
                                                                 "/daq/run/f.fits")
    assert d["confirmed_at"] == "2025-12-06T05:46:40.250000Z"
    assert [r["location"] for r in d["replicas"]] == ["RSE_A", "RSE_B"]          # by location
    assert d["replicas"][0] == {"location": "RSE_A", "url": "https://a/f", "size": 10, "adler32": "0000abcd",
                                "state": "AVAILABLE", "checksum_from": "catalogue"}
    assert d["replicas"][1]["checksum_from"] == "storage"
    assert d["file"] == {"id": 7, "version": 2} and d["agent"] == {"host": "daq01", "agent_id": None,
                                                                   "version": "0.1.0"}
    assert json.loads(receipts.encode(d)) == d and receipts.encode(d).endswith(b"\n")


def test_a_path_that_is_not_utf8_is_shown_and_kept_in_hex() -> None:
    raw = b"/daq/caf\xe9.fits"
    d = doc(v=receipts.Version(**{**V.__dict__, "path": raw}))
    assert d["path"] == "/daq/caf\\xe9.fits" and bytes.fromhex(str(d["path_hex"])) == raw
    receipts.encode(d).decode("ascii")


def test_the_same_evidence_is_the_same_receipt_whoever_wrote_it_when() -> None:
    old = receipts.encode(doc())
    assert receipts.same(old, doc(written_at=1.0, host="daq02", agent_id="a2"))
    assert receipts.same(old, doc(replicas=list(reversed(REPLICAS))))
    assert not receipts.same(old, doc(local_copy=receipts.KEPT))
    assert not receipts.same(old, doc(replicas=REPLICAS[:1]))
    assert not receipts.same(None, doc()) and not receipts.same(b"{half", doc()) and not receipts.same(b"[]", doc())
