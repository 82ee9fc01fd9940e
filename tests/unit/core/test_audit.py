"""core/audit.py: one verdict per file from the ledger, the catalogue and the storage's answers."""

from __future__ import annotations

import json

import pytest

from edge_agent.core.audit import (
    CatalogueView,
    CopyCheck,
    LedgerView,
    Report,
    Verdict,
    judge_file,
    judge_unknown,
    render,
)
from edge_agent.core.lifecycle import State

A = "0a1b2c3d"


def led(state: State = State.DELETED, size: int = 100, adler: str = A, copies: int = 2,
        reason: str | None = None) -> LedgerView:
    return LedgerView(7, "daq", "n1/f.fits", state, size, adler, copies, reason)


def copy(loc: str, size: int | None = 100, adler: str | None = A, state: str = "AVAILABLE", **kw) -> CopyCheck:
    return CopyCheck(loc, f"https://{loc}/f", state, size, adler, **kw)


def cat(*copies: CopyCheck, size: int = 100, adler: str = A) -> CatalogueView:
    return CatalogueView(size, adler, copies)


def test_two_good_copies_of_a_deleted_file_are_ok() -> None:
    a = judge_file("s:f", led(), cat(copy("L1"), copy("L2")))
    assert a.verdict is Verdict.OK and a.good_copies == ("L1", "L2") and not a.problem


def test_adler32_is_compared_normalised() -> None:
    a = judge_file("s:f", led(adler="a1b2c3d"), cat(copy("L1", adler="0x0A1B2C3D"), copy("L2"), adler="0a1b2c3d"))
    assert a.verdict is Verdict.OK


def test_other_bytes_on_storage_is_a_checksum_mismatch_naming_the_copy() -> None:
    a = judge_file("s:f", led(), cat(copy("L1"), copy("L2", adler="deadbeef")))
    assert a.verdict is Verdict.CHECKSUM_MISMATCH
    bad = [f for f in a.findings if f.verdict is Verdict.CHECKSUM_MISMATCH]
    assert bad[0].location == "L2" and "deadbeef" in bad[0].detail


def test_other_size_on_storage_is_a_checksum_mismatch() -> None:
    assert judge_file("s:f", led(), cat(copy("L1", size=99), copy("L2"))).verdict is Verdict.CHECKSUM_MISMATCH


def test_catalogue_disagreeing_with_the_ledger_is_a_mismatch() -> None:
    a = judge_file("s:f", led(), cat(copy("L1", adler="11111111"), copy("L2", adler="11111111"), adler="11111111"))
    assert a.verdict is Verdict.CHECKSUM_MISMATCH
    assert any("catalogue" in f.detail for f in a.findings)


def test_a_listed_copy_whose_storage_holds_nothing_is_missing() -> None:
    a = judge_file("s:f", led(), cat(copy("L1"), copy("L2", size=None, adler=None)))
    assert a.verdict is Verdict.MISSING_REPLICA
    assert any(f.location == "L2" and "holds nothing" in f.detail for f in a.findings)


def test_too_few_copies_for_a_confirmed_file_is_missing() -> None:
    a = judge_file("s:f", led(State.CONFIRMED), cat(copy("L1")))
    assert a.verdict is Verdict.MISSING_REPLICA and "1 of 2 wanted copies are good" in a.findings[-1].detail


def test_a_settled_file_the_lake_does_not_know_is_missing() -> None:
    assert judge_file("s:f", led(), None).verdict is Verdict.MISSING_REPLICA


def test_a_copy_still_copying_for_a_transferred_file_is_in_flight() -> None:
    a = judge_file("s:f", led(State.TRANSFERRED), cat(copy("L1"), copy("L2", None, None, "COPYING", checked=False)))
    assert a.verdict is Verdict.IN_FLIGHT and not a.problem


def test_corruption_shows_even_while_in_flight() -> None:
    a = judge_file("s:f", led(State.TRANSFERRED), cat(copy("L1", adler="deadbeef")))
    assert a.verdict is Verdict.CHECKSUM_MISMATCH


@pytest.mark.parametrize("state", [State.DISCOVERED, State.COMPLETE, State.HASHED, State.RETRY_WAIT])
def test_files_not_yet_registered_are_in_flight_without_a_catalogue_entry(state: State) -> None:
    assert judge_file("s:f", led(state), None).verdict is Verdict.IN_FLIGHT


def test_quarantined_is_a_problem_with_its_reason() -> None:
    a = judge_file("s:f", led(State.QUARANTINED, reason="zero-byte file"), None)
    assert a.verdict is Verdict.QUARANTINED and a.problem and "zero-byte file" in a.findings[0].detail


def test_a_lake_only_did_without_bytes_anywhere_is_registered_without_file() -> None:
    a = judge_file("s:f", None, cat(copy("L1", size=None, adler=None)))
    assert a.verdict is Verdict.REGISTERED_WITHOUT_FILE


def test_a_lake_only_did_without_any_replica_is_registered_without_file() -> None:
    assert judge_file("s:f", None, cat()).verdict is Verdict.REGISTERED_WITHOUT_FILE


def test_a_dangling_registration_says_which_superseded_version_left_it() -> None:
    a = judge_file("s:f", None, cat(copy("L1", None, None, "COPYING", checked=False)),
                   history="the ledger's #3 registered it and was then superseded: changed")
    assert a.verdict is Verdict.REGISTERED_WITHOUT_FILE
    assert a.findings[-1].detail.endswith("superseded: changed")


def test_a_lake_only_did_with_a_good_copy_is_ok() -> None:
    assert judge_file("s:f", None, cat(copy("L1"))).verdict is Verdict.OK


def test_a_storage_that_cannot_be_asked_is_unverifiable_not_missing() -> None:
    a = judge_file("s:f", led(), cat(copy("L1"), CopyCheck("L2", "u", "AVAILABLE", error="timed out")))
    assert a.verdict is Verdict.UNVERIFIABLE and a.problem


def test_a_storage_without_checksum_is_unverifiable() -> None:
    assert judge_file("s:f", led(), cat(copy("L1"), copy("L2", adler=None))).verdict is Verdict.UNVERIFIABLE


MD5 = "5d41402abc4b2a76b9719d911017c592"


def test_an_s3_copy_counts_by_its_etag_against_the_recorded_md5() -> None:
    """S3 has no adler32: a copy whose ETag is the MD5 the ledger recorded is good (the agent's
    own rule); the catalogue's MD5 serves when the ledger has none (a lake-only DID)."""
    s3 = copy("S3", adler=None, stored_md5=MD5.upper())
    with_md5 = LedgerView(7, "daq", "n1/f.fits", State.DELETED, 100, A, 2, None, MD5)
    a = judge_file("s:f", with_md5, cat(copy("L1"), s3))
    assert a.verdict is Verdict.OK and a.good_copies == ("L1", "S3")
    assert judge_file("s:f", led(), CatalogueView(100, A, (copy("L1"), s3), MD5)).verdict is Verdict.OK


def test_an_s3_copy_with_another_etag_is_a_checksum_mismatch_and_without_md5_unverifiable() -> None:
    with_md5 = LedgerView(7, "daq", "n1/f.fits", State.DELETED, 100, A, 2, None, MD5)
    a = judge_file("s:f", with_md5, cat(copy("L1"), copy("S3", adler=None, stored_md5="0" * 32)))
    assert a.verdict is Verdict.CHECKSUM_MISMATCH and a.good_copies == ("L1",)
    assert any(f.location == "S3" and "ETag" in f.detail for f in a.findings)
    # no MD5 recorded anywhere (md5 = false), or a multipart ETag (no MD5): nothing to compare
    assert judge_file("s:f", led(), cat(copy("L1"), copy("S3", adler=None, stored_md5=MD5))).verdict \
        is Verdict.UNVERIFIABLE
    assert judge_file("s:f", with_md5, cat(copy("L1"), copy("S3", adler=None))).verdict is Verdict.UNVERIFIABLE


def test_the_buffer_copy_never_counts_and_may_be_gone_after_deletion() -> None:
    buf = copy("BUF", size=None, adler=None, is_buffer=True)
    assert judge_file("s:f", led(), cat(buf, copy("L1"), copy("L2"))).verdict is Verdict.OK
    a = judge_file("s:f", led(copies=1), cat(copy("BUF", is_buffer=True)))
    assert a.verdict is Verdict.MISSING_REPLICA and a.good_copies == ()


def test_the_worst_finding_wins() -> None:
    a = judge_file("s:f", led(), cat(copy("L1", size=None, adler=None), copy("L2", adler="deadbeef")))
    assert a.verdict is Verdict.CHECKSUM_MISMATCH
    assert {f.verdict for f in a.findings} >= {Verdict.CHECKSUM_MISMATCH, Verdict.MISSING_REPLICA}


def test_unknown_file_in_buffer_after_the_grace_period() -> None:
    assert judge_unknown("/buf/x.fits", 5, 10).verdict is Verdict.IN_FLIGHT
    a = judge_unknown("/buf/x.fits", 3725, 10)
    assert a.verdict is Verdict.UNKNOWN_IN_BUFFER and a.problem and a.path == "/buf/x.fits"
    assert a.findings[0].detail.startswith("1h02m05s old")


def test_report_json_is_stable_and_exit_status_follows_problems() -> None:
    r = Report("night 2026-11-24")
    r.add([judge_file("s:b", led(), cat(copy("L1"), copy("L2"))),
           judge_file("s:a", led(State.TRANSFERRED), cat(copy("L1")))])
    assert r.ok
    doc = r.to_json()
    assert list(doc) == ["format", "selection", "ok", "counts", "files"] and doc["format"] == "edge-agent-audit/1"
    assert list(doc["counts"]) == [v.value for v in Verdict]          # every heading, always, in one order
    assert doc["counts"]["ok"] == 1 and doc["counts"]["in_flight"] == 1
    assert doc["files"]["ok"][0]["did"] == "s:b" and doc["files"]["ok"][0]["ledger"]["id"] == 7
    json.dumps(doc)
    r.add([judge_unknown("/buf/x", 999, 10)])
    assert not r.ok and r.to_json()["files"]["unknown_in_buffer"][0]["path"] == "/buf/x"


def test_rendered_report_puts_the_verdict_first_and_names_each_problem() -> None:
    r = Report("the whole ledger")
    r.add([judge_file("s:good", led(), cat(copy("L1"), copy("L2"))),
           judge_file("s:bad", led(), cat(copy("L1"), copy("L2", adler="deadbeef")))])
    text = render(r)
    lines = text.splitlines()
    assert lines[1] == "PROBLEMS: 1 of 2 files need attention"
    assert "CHECKSUM MISMATCH" in text and "s:bad" in text and "L2: the storage says adler32 deadbeef" in text
    assert "s:good" not in text and "s:good" in render(r, verbose=True)
    clean = Report("x")
    clean.add([judge_file("s:good", led(), cat(copy("L1"), copy("L2")))])
    assert render(clean).splitlines()[1] == "ALL WELL"
