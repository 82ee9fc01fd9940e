"""Night close-out's decisions (core/nights.py), stated as situations: no clock, no ledger."""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo

import pytest

from edge_agent.core import nights as n
from edge_agent.core.lifecycle import State
from edge_agent.core.policy import night_of

S = State
UTC = dt.UTC
H = 3600.0


def f(state: State, relpath: str = "a.fits", version: int = 1, size: int = 10, reason: str | None = None,
      successor: State | None = None, fid: int = 1) -> n.NightFile:
    return n.NightFile(id=fid, relpath=relpath, version=version, state=state, size=size, did=f"s:{relpath}",
                       adler32="00000001", blake3="b3", confirmed_at=1.0, reason=reason, successor=successor)


END = n.night_end("20240310", 12, UTC)


def decide(files: list[n.NightFile], now: float, grace_h: float = 2, deadline_h: float = 12,
           keeps: bool = False) -> n.Decision:
    return n.decide(files, END, now, grace_h * H, deadline_h * H, confirmed_is_final=keeps)


def test_a_night_ends_at_the_next_rollover_in_its_own_time_zone() -> None:
    assert END == dt.datetime(2024, 3, 11, 12, tzinfo=UTC).timestamp()
    la = zoneinfo.ZoneInfo("America/Los_Angeles")
    # DST starts in Los Angeles on 2024-03-10: the night of the 9th ends at 12:00 PDT (19:00 UTC)
    assert n.night_end("20240309", 12, la) == dt.datetime(2024, 3, 10, 19, tzinfo=UTC).timestamp()
    # a file just before the end belongs to the night, one at the end to the next (policy.night_of)
    end = n.night_end("20240309", 12, la)
    assert night_of(end - 1, 12, la) == "20240309" and night_of(end, 12, la) == "20240310"
    canary = zoneinfo.ZoneInfo("Atlantic/Canary")
    end = n.night_end("20240701", 9, canary)
    assert night_of(end - 1, 9, canary) == "20240701" and night_of(end, 9, canary) == "20240702"


def test_not_before_the_rollover_plus_the_grace_period() -> None:
    files = [f(S.DELETED)]
    assert not decide(files, END - 1).close
    assert not decide(files, END + 2 * H - 1).close
    d = decide(files, END + 2 * H)
    assert d.close and d.verdict == n.Verdict.COMPLETE and d.reasons == ()
    assert decide(files, END, grace_h=0).close


def test_a_file_still_in_work_holds_the_night_open_and_it_becomes_overdue() -> None:
    for state in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.RETRY_WAIT):
        d = decide([f(S.DELETED, "a"), f(state, "b", fid=2)], END + 3 * H)
        assert not d.close and state.value in d.waiting and not d.overdue, state
    d = decide([f(S.DELETED, "a"), f(S.TRANSFERRED, "b", fid=2)], END + 12 * H)
    assert not d.close and d.overdue


def test_confirmed_counts_only_where_the_rule_keeps_confirmed_files() -> None:
    files = [f(S.CONFIRMED)]
    assert not decide(files, END + 3 * H).close                # after_confirm: deletion is due
    assert decide(files, END + 3 * H, keeps=True).close        # keep / never / dry-run


def test_a_quarantined_file_makes_the_night_incomplete_with_its_reason() -> None:
    d = decide([f(S.DELETED, "a"), f(S.QUARANTINED, "z.fits", size=0, reason="zero-byte file", fid=2)],
               END + 3 * H)
    assert d.close and d.verdict == n.Verdict.INCOMPLETE
    assert d.reasons == ("z.fits: quarantined: zero-byte file",)
    assert (d.files, d.bytes) == (2, 10)


def test_a_superseded_version_is_listed_but_not_a_failure_once_a_later_one_is_delivered() -> None:
    old = f(S.SUPERSEDED, "a", version=1, reason="rewritten after hashing", successor=S.DELETED)
    new = f(S.DELETED, "a", version=2, fid=2)
    d = decide([old, new], END + 3 * H)
    assert d.close and d.verdict == n.Verdict.COMPLETE and d.files == 1
    # the later version still in work: the night waits for it
    assert not decide([dataclass_replace(old, successor=S.TRANSFERRED)], END + 3 * H).close
    # no later version at all (the file vanished after hashing): incomplete
    d = decide([dataclass_replace(old, successor=None, reason="vanished")], END + 3 * H)
    assert d.verdict == n.Verdict.INCOMPLETE and "no later version delivered: vanished" in d.reasons[0]
    d = decide([dataclass_replace(old, successor=S.QUARANTINED)], END + 3 * H)
    assert d.verdict == n.Verdict.INCOMPLETE


def dataclass_replace(x: n.NightFile, **kw: object) -> n.NightFile:
    return dataclasses.replace(x, **kw)  # type: ignore[arg-type]


def test_late_datasets_are_named_after_their_night_and_numbered() -> None:
    assert n.late_dataset("r.20240310", []) == "r.20240310.late"
    assert n.late_dataset("r.20240310", ["r.20240310.late"]) == "r.20240310.late2"
    assert n.late_dataset("r.20240310", ["r.20240310.late", "r.20240310.late2"]) == "r.20240310.late3"
    assert n.late_of("r.20240310.late") == "r.20240310"
    assert n.late_of("r.20240310.late12") == "r.20240310"
    assert n.late_of("r.20240310") is None and n.late_of("x.lateral") is None


@pytest.mark.parametrize("verdict_files", [[S.DELETED], [S.DELETED, S.QUARANTINED]])
def test_the_manifest_lists_every_version_with_its_checksums_and_the_verdict(verdict_files: list[State]) -> None:
    files = [f(st, f"f{i}", reason="why" if st is S.QUARANTINED else None, fid=i) for i, st in enumerate(verdict_files)]
    files[0] = dataclass_replace(files[0], replicas=(("a", "/lake-a/s/f0"),))
    d = decide(files, END + 3 * H)
    doc = n.manifest("r", "s", "r.20240310", "20240310", files, d, 5.0)
    assert doc["verdict"] == d.verdict and doc["files"] == len(files) and doc["dataset"] == "r.20240310"
    e0 = doc["entries"][0]
    assert (e0["did"], e0["size"], e0["adler32"], e0["blake3"], e0["confirmed_at"]) == ("s:f0", 10, "00000001", "b3", 1.0)
    assert e0["replicas"] == [{"location": "a", "url": "/lake-a/s/f0"}] and "reason" not in e0
    if len(files) > 1:
        assert doc["entries"][1]["reason"] == "why"
