"""audit.run_audit with a real ledger and buffer, the in-memory catalogue and a fake storage: what
is selected, what the lake is asked, and what is found in the buffer."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from edge_agent.audit import Selection, run_audit
from edge_agent.core.lifecycle import Event as E
from edge_agent.core.lifecycle import State as S
from edge_agent.errors import ConfigError, RetryableError
from edge_agent.lake.base import LakeFile
from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.ledger import Ledger
from edge_agent.settings import Settings, load_settings
from edge_agent.transfer.base import RemoteStat

A = "0a1b2c3d"
NOW = dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.timezone.utc).timestamp()
NIGHT_24 = dt.datetime(2026, 11, 25, 3, 0, tzinfo=dt.timezone.utc).timestamp()   # before the 12:00 rollover
NIGHT_23 = dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.timezone.utc).timestamp()


class FakeLake(MemoryCatalogue):
    """The shipped in-memory catalogue; `asked`: the DIDs it was looked up for."""

    def __init__(self) -> None:
        super().__init__({})
        self.asked = self.looked_up

    def holds(self, name: str, size: int = 100, adler: str = A, state: str = "AVAILABLE",
              dataset: str | None = None) -> None:
        """s:name registered (in `dataset`), with one replica on l1 at /lake/name in `state`."""
        self.register(LakeFile(rule="daq", scope="s", name=name, dataset=dataset, size=size, adler32=adler,
                               md5=None, blake3="b", copies=1, destinations=("l1",), local_path=f"/buf/{name}"))
        self.list_replica(f"s:{name}", "l1", f"/lake/{name}", state=state)


def storage(answers: dict[str, RemoteStat | None | Exception]):  # type: ignore[no-untyped-def]
    def probe(location: str, url: str, deep: bool) -> RemoteStat | None:
        a = answers.get(url)
        if isinstance(a, Exception):
            raise a
        return a
    return probe


@pytest.fixture
def env(tmp_path: Path) -> tuple[Settings, Ledger, Path]:
    buf = tmp_path / "buf"
    buf.mkdir()
    (tmp_path / "l1").mkdir()
    s = load_settings(None, state_dir=tmp_path / "state", rescan_seconds=60,
                      destinations={"l1": {"path": str(tmp_path / "l1")}},
                      rules={"daq": {"directory": str(buf), "scope": "s", "destinations": ["l1"], "copies": 1,
                                     "dataset_template": "daq.{night}"}})
    return s, Ledger(s.ledger_path), buf


def ingested(led: Ledger, buf: Path, name: str, mtime: float, state: S = S.DELETED, dataset: str | None = None) -> int:
    rec = led.discover("daq", os.fsencode(buf / name), name, dev=1, inode=hash(name) & 0xFFFF, size=100,
                       mtime_ns=int(mtime * 1e9), priority=0)
    night = dt.datetime.fromtimestamp(mtime - 12 * 3600, dt.timezone.utc).strftime("%Y%m%d")
    led.transition(rec.id, S.DISCOVERED, E.COMPLETED)
    led.transition(rec.id, S.COMPLETE, E.HASHED, blake3="b", adler32=A, scope="s", name=name,
                   dataset=dataset or f"daq.{night}")
    path = [(S.HASHED, E.REGISTERED), (S.REGISTERED, E.COPIED), (S.COPIED, E.TRANSFERRED), (S.TRANSFERRED, E.CONFIRMED),
            (S.CONFIRMED, E.DELETED)]
    for frm, ev in path:
        if frm is state:
            break
        led.transition(rec.id, frm, ev)
    return rec.id


def test_night_selects_by_the_rules_night_and_asks_the_lake_only_about_it(env) -> None:  # type: ignore[no-untyped-def]
    s, led, buf = env
    ingested(led, buf, "a.fits", NIGHT_24)
    ingested(led, buf, "b.fits", NIGHT_23)
    lake = FakeLake()
    lake.holds("a.fits")
    lake.holds("b.fits")
    good = storage({"/lake/a.fits": RemoteStat(100, A), "/lake/b.fits": RemoteStat(100, A)})
    r = run_audit(s, led, lake, good, Selection(night="2026-11-24"), now=NOW)
    assert [f.did for f in r.files] == ["s:a.fits"] and r.ok and lake.asked == [("s", "a.fits")]
    assert r.selection == "night 2026-11-24"
    r = run_audit(s, led, lake, good, Selection(), now=NOW)
    assert sorted(f.did for f in r.files) == ["s:a.fits", "s:b.fits"] and r.ok


def test_dataset_brings_in_what_the_lake_holds_that_the_ledger_does_not(env) -> None:  # type: ignore[no-untyped-def]
    s, led, buf = env
    ingested(led, buf, "a.fits", NIGHT_24)
    lake = FakeLake()
    lake.holds("a.fits", dataset="daq.20261124")
    lake.holds("ghost.fits", dataset="daq.20261124")
    r = run_audit(s, led, lake, storage({"/lake/a.fits": RemoteStat(100, A)}),
                  Selection(dataset="s:daq.20261124"), now=NOW)
    verdicts = {f.did: f.verdict.value for f in r.files}
    assert verdicts == {"s:a.fits": "ok", "s:ghost.fits": "registered_without_file"} and not r.ok


def test_a_dangling_did_left_by_a_superseded_version_says_so(env) -> None:  # type: ignore[no-untyped-def]
    s, led, buf = env
    ingested(led, buf, "a.fits", NIGHT_24)
    old = ingested(led, buf, "old.fits", NIGHT_24, state=S.REGISTERED)
    led.transition(old, S.REGISTERED, E.SUPERSEDED, reason="changed after hashing")
    lake = FakeLake()
    lake.holds("a.fits", dataset="daq.20261124")
    lake.holds("old.fits", state="COPYING", dataset="daq.20261124")
    r = run_audit(s, led, lake, storage({"/lake/a.fits": RemoteStat(100, A)}), Selection(), now=NOW)
    dangling = next(f for f in r.files if f.did == "s:old.fits")
    assert dangling.verdict.value == "registered_without_file"
    assert "superseded: changed after hashing" in dangling.findings[-1].detail


def test_a_storage_that_does_not_answer_is_unverifiable(env) -> None:  # type: ignore[no-untyped-def]
    s, led, buf = env
    ingested(led, buf, "a.fits", NIGHT_24)
    lake = FakeLake()
    lake.holds("a.fits")
    r = run_audit(s, led, lake, storage({"/lake/a.fits": RetryableError("HEAD timed out")}), Selection(), now=NOW)
    assert r.files[0].verdict.value == "unverifiable" and "timed out" in r.files[0].findings[0].detail


def test_buffer_files_unknown_to_the_ledger_after_the_grace_period(env) -> None:  # type: ignore[no-untyped-def]
    s, led, buf = env
    rid = ingested(led, buf, "known.fits", NIGHT_24, state=S.TRANSFERRED)
    (buf / "known.fits").write_bytes(b"k")
    (buf / "old.fits").write_bytes(b"o")
    os.utime(buf / "old.fits", (NIGHT_24, NIGHT_24))
    (buf / "fresh.fits").write_bytes(b"f")
    os.utime(buf / "fresh.fits", (NOW - 10, NOW - 10))
    (buf / "writing.fits.part").write_bytes(b"w")          # a temporary name: never data
    os.utime(buf / "writing.fits.part", (NIGHT_24, NIGHT_24))
    lake = FakeLake()
    r = run_audit(s, led, lake, storage({}), Selection(), now=NOW)
    by = {f.did: f.verdict.value for f in r.files}
    assert by == {"s:known.fits": "in_flight", str(buf / "old.fits"): "unknown_in_buffer",
                  str(buf / "fresh.fits"): "in_flight"}
    assert led.get(rid).state is S.TRANSFERRED
    # a night selection takes buffer files by their own night
    r = run_audit(s, led, lake, storage({}), Selection(night="20261123"), now=NOW)
    assert r.files == []


def test_selection_errors_are_usage_errors(env) -> None:  # type: ignore[no-untyped-def]
    s, led, _ = env
    with pytest.raises(ConfigError, match="no such rule"):
        run_audit(s, led, FakeLake(), storage({}), Selection(rule="nope"))
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        Selection(night="24.11.2026")
    with pytest.raises(ConfigError, match="scope:name"):
        Selection(dataset="daq.20261124")
    assert Selection(night="2026-11-24").night == "20261124"


def test_rule_selects_that_rules_files_and_buffer_only(tmp_path: Path) -> None:
    """--rule: the other rule's ledger rows are not judged, its DIDs not asked about, and a stray
    file in its buffer is not reported."""
    bufs = {r: tmp_path / r for r in ("cam", "spec")}
    for b in [*bufs.values(), tmp_path / "l1"]:
        b.mkdir()
    s = load_settings(None, state_dir=tmp_path / "state", rescan_seconds=60,
                      destinations={"l1": {"path": str(tmp_path / "l1")}},
                      rules={r: {"directory": str(b), "scope": "s", "destinations": ["l1"], "copies": 1,
                                 "dataset_template": f"{r}.{{night}}"} for r, b in bufs.items()})
    led = Ledger(s.ledger_path)
    for rule, name in (("cam", "c.fits"), ("spec", "p.fits")):
        rec = led.discover(rule, os.fsencode(bufs[rule] / name), name, dev=1, inode=len(name) + len(rule),
                           size=100, mtime_ns=int(NIGHT_24 * 1e9), priority=0)
        led.transition(rec.id, S.DISCOVERED, E.COMPLETED)
        led.transition(rec.id, S.COMPLETE, E.HASHED, blake3="b", adler32=A, scope="s", name=name,
                       dataset=f"{rule}.20261124")
    for rule, b in bufs.items():            # an old stray file in each buffer
        (b / f"stray-{rule}.fits").write_bytes(b"x")
        os.utime(b / f"stray-{rule}.fits", (NIGHT_23, NIGHT_23))
    lake = FakeLake()
    r = run_audit(s, led, lake, storage({}), Selection(rule="spec"), now=NOW)
    assert r.selection == "rule spec"
    assert sorted(f.did for f in r.files) == sorted(["s:p.fits", str(bufs["spec"] / "stray-spec.fits")])
    assert lake.asked == [("s", "p.fits")]
    r = run_audit(s, led, FakeLake(), storage({}), Selection(), now=NOW)
    assert sorted(f.did for f in r.files) == sorted(["s:c.fits", "s:p.fits", str(bufs["cam"] / "stray-cam.fits"),
                                                     str(bufs["spec"] / "stray-spec.fits")])
    led.close()
