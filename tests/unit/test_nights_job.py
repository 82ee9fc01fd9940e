"""The close-out job (nights.py) on the local lake, with a real ledger, real files and the real steps:
a night delivered, closed after its grace period with its manifest in the catalogue and on the
destinations, incomplete when a file is quarantined, a late file in a dataset of its own, and a
close-out cut short finished with the same manifest."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from edge_agent import steps
from edge_agent.app import build_catalogue, build_transports
from edge_agent.core import nights as core
from edge_agent.core.lifecycle import Event, State
from edge_agent.errors import PermanentError, RetryableError
from edge_agent.lake.base import LakeFile
from edge_agent.lake.local import LocalCatalogue
from edge_agent.ledger import FileRecord
from edge_agent.nightbook import CLOSED, CLOSING, OPEN
from edge_agent.nights import CloseOut
from edge_agent.settings import Settings
from edge_agent.status import nights as view
from edge_agent.steps import StepContext

from .ledgers import open_ledger

S, E = State, Event
H = 3600.0
DAY = 86400.0


class Night:
    def __init__(self, tmp: Path, clock: Any, settings: Settings) -> None:
        self.tmp, self.clock, self.s = tmp, clock, settings
        self.daq = tmp / "daq"
        self.daq.mkdir()
        for d in ("lake-a", "lake-b"):
            (tmp / d).mkdir()
        self.ledger = open_ledger(settings.ledger_path, clock=clock)
        self.lake = build_catalogue(settings)
        assert isinstance(self.lake, LocalCatalogue)
        self.transports = build_transports(settings)
        self.ctx = StepContext(settings, self.ledger, self.lake, self.transports, pace=lambda n: None, clock=clock,
                               rand=lambda: 0.5, monotonic=clock)
        self.job = CloseOut(settings, self.ledger, self.lake, self.transports, clock)
        # written an hour ago (2023-11-14 21:13 UTC): night 20231114, which ends on the 15th at noon
        self.mtime = clock.now - H

    def add(self, rel: str, data: bytes, mtime: float | None = None) -> FileRecord:
        p = self.daq / rel
        p.write_bytes(data)
        t = self.mtime if mtime is None else mtime
        os.utime(p, (t, t))
        st = os.stat(p)
        rec = self.ledger.discover("r", os.fsencode(p), rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
        return self.ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED)

    def drive(self, fid: int, until: State = S.DELETED) -> FileRecord:
        rec = self.ledger.get(fid)
        for _ in range(12):
            if rec.state in (until, S.DELETED, S.QUARANTINED, S.SUPERSEDED):
                return rec
            steps.run([rec], self.ctx)
            rec = self.ledger.get(fid)
        return rec

    def run_at(self, now: float) -> list[dict[str, Any]]:
        """The job run with the clock at `now` (the ledger's clock too)."""
        self.clock.now = max(self.clock.now, now)
        return self.job.run()

    def dataset(self) -> str:
        from edge_agent.core.policy import night_of
        return f"r.{night_of(self.mtime, 12, self.s.rules['r'].tz)}"


@pytest.fixture
def night(tmp_path: Path, clock: Any, settings_data: Any) -> Any:
    clock.now = 1_700_000_000.0
    s = Settings(**settings_data(tmp_path, rule={"close_nights": True, "night_grace_hours": 2,
                                                  "night_deadline_hours": 30}))
    n = Night(tmp_path, clock, s)
    yield n
    n.ledger.close()
    n.lake.close()


def catalogue_rows(n: Night, sql: str, *args: Any) -> list[Any]:
    import sqlite3
    db = sqlite3.connect(n.s.lake_catalog_path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_a_delivered_night_is_closed_complete_with_its_manifest_in_the_lake(night: Night) -> None:
    files = {f"f{i}.fits": os.urandom(1000 + i) for i in range(3)}
    ids = [night.add(k, v).id for k, v in files.items()]
    assert [night.drive(i).state for i in ids] == [S.DELETED] * 3
    ds = night.dataset()
    # the grace period is not over yet: the night stays open
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    assert night.run_at(ends + 1 * H) == []
    assert night.ledger.night_states("r", [ds]) == {ds: OPEN}
    done = night.run_at(ends + 2 * H)
    assert done == [{"rule": "r", "dataset": ds, "outcome": "closed", "verdict": "complete",
                     "manifest": f"test:{ds}.manifest.json"}]
    row = night.ledger.nights(5)[0]
    assert (row["state"], row["verdict"], row["reasons"], row["files"], row["bytes"]) == (
        CLOSED, "complete", [], 3, sum(map(len, files.values())))
    assert night.lake.dataset_closed("test", ds)
    # the manifest: a file DID in the night's dataset, copied to both destinations, as kept in the state dir
    kept = night.job.manifest_path("r", ds).read_bytes()
    name = f"{ds}.manifest.json"
    assert catalogue_rows(night, "SELECT type, bytes FROM dids WHERE name = ?", name) == [("FILE", len(kept))]
    assert ("test", name) in catalogue_rows(night, "SELECT child_scope, child_name FROM contents WHERE name = ?", ds)
    assert sorted(r[0] for r in catalogue_rows(night, "SELECT location FROM replicas WHERE name = ?", name)) == ["a", "b"]
    for d in ("lake-a", "lake-b"):
        assert (night.tmp / d / "test" / name).read_bytes() == kept
    doc = json.loads(kept)
    assert doc["verdict"] == "complete" and doc["dataset"] == ds and doc["files"] == 3
    for e in doc["entries"]:
        assert e["did"] == f"test:{e['path']}" and e["size"] == len(files[e["path"]]) and e["state"] == "deleted"
        assert {r["location"] for r in e["replicas"]} == {"a", "b"} and e["confirmed_at"] and e["blake3"]
    # nothing is attached to the closed dataset any more (as Rucio refuses it)
    with pytest.raises(PermanentError, match="closed"):
        night.lake.register(LakeFile("r", "test", "other", ds, 1, "00000001", None, "b", 2, ("a",), "/x"))
    assert night.run_at(ends + 3 * H) == []      # closed once


def test_a_quarantined_file_makes_the_night_incomplete_and_a_late_file_gets_its_own_dataset(night: Night) -> None:
    good = night.add("good.fits", b"x" * 500)
    empty = night.add("empty.fits", b"")
    assert night.drive(good.id).state is S.DELETED
    assert night.drive(empty.id).state is S.QUARANTINED          # not hashed: no dataset, its night by mtime
    ds = night.dataset()
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    [done] = night.run_at(ends + 2 * H)
    assert done["verdict"] == "incomplete"
    row = night.ledger.nights(5)[0]
    assert row["reasons"] == [("empty.fits: quarantined: zero-byte file: a failed write? (set allow_empty = true "
                               f"for this rule to upload empty files, then `edge-agent retry {empty.id}`)")]
    doc = json.loads(night.job.manifest_path("r", ds).read_bytes())
    assert {e["path"]: e["state"] for e in doc["entries"]} == {"good.fits": "deleted", "empty.fits": "quarantined"}
    assert "zero-byte" in next(e for e in doc["entries"] if e["path"] == "empty.fits")["reason"]
    # a file of that night arriving now goes to <dataset>.late, which is closed by the same rules
    late = night.add("late.fits", b"y" * 300)
    rec = night.drive(late.id)
    assert rec.state is S.DELETED and rec.dataset == f"{ds}.late"
    hashed = next(h for h in night.ledger.history(late.id) if h["event"] == "hashed")
    assert hashed["detail"]["late_of"] == ds
    [done] = night.run_at(ends + 3 * H)
    assert (done["dataset"], done["verdict"]) == (f"{ds}.late", "complete")
    assert night.lake.dataset_closed("test", f"{ds}.late")
    # and the next late one goes to .late2
    again = night.drive(night.add("later.fits", b"z" * 10).id)
    assert again.dataset == f"{ds}.late2"
    shown = view.listed(night.s, night.ledger, ends + 3 * H)
    assert [(x["dataset"], x["state"], x["late_of"]) for x in shown][:1] == [(f"{ds}.late2", OPEN, ds)]
    summary = view.summary(night.s, night.ledger, ends + 3 * H)["r"]
    assert (summary["complete"], summary["incomplete"], summary["open"], summary["late_files"]) == (1, 1, 1, 1)


def test_a_file_still_in_work_holds_its_night_open_until_the_deadline(night: Night) -> None:
    rec = night.add("slow.fits", b"x" * 10)
    night.drive(rec.id, until=S.HASHED)
    ds = night.dataset()
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    assert night.run_at(ends + 29 * H) == []
    assert not view.listed(night.s, night.ledger, ends + 29 * H)[0]["overdue"]
    assert view.listed(night.s, night.ledger, ends + 30 * H)[0]["overdue"]
    assert view.summary(night.s, night.ledger, ends + 30 * H)["r"]["overdue"] == 1
    # a file not even hashed yet holds its night open too (its night is known from its mtime)
    waiting = night.add("waiting.fits", b"w", mtime=night.mtime - DAY)
    night.run_at(ends + 30 * H)
    assert any(x["state"] == OPEN and x["night"] for x in night.ledger.unclosed_nights("r") if x["dataset"] != ds)
    assert night.drive(rec.id).state is S.DELETED
    assert night.drive(waiting.id).state is S.DELETED
    assert [d["verdict"] for d in night.run_at(ends + 31 * H)] == ["complete", "complete"]


def test_a_close_out_cut_short_is_finished_with_the_same_manifest(night: Night, monkeypatch: Any) -> None:
    assert night.drive(night.add("a.fits", b"a" * 100).id).state is S.DELETED
    ds = night.dataset()
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)

    def down(scope: str, name: str) -> None:
        raise RetryableError("local lake catalogue: disk I/O error")
    monkeypatch.setattr(night.lake, "close_dataset", down)
    [done] = night.run_at(ends + 2 * H)
    assert done["outcome"] == "failed"
    assert night.ledger.night_states("r", [ds]) == {ds: CLOSING}
    first = night.job.manifest_path("r", ds).read_bytes()
    monkeypatch.undo()
    [done] = night.run_at(ends + 5 * H)
    assert done["verdict"] == "complete"
    assert night.job.manifest_path("r", ds).read_bytes() == first
    assert (night.tmp / "lake-a" / "test" / f"{ds}.manifest.json").read_bytes() == first
    assert night.ledger.nights(1)[0]["closed_at"] == ends + 5 * H


@pytest.mark.parametrize(("rule", "says"), [
    ({"close_nights": True, "dataset_template": "{rule}.{date}"}, "needs {night} in dataset_template"),
    ({"close_nights": True, "dataset_template": ""}, "needs {night} in dataset_template"),
    ({"close_nights": True, "night_grace_hours": 6, "night_deadline_hours": 3}, "night_deadline_hours"),
    ({"close_nights": True, "inject": "register", "buffer_rse": "B", "buffer_url": "root://b//d/"}, "inject = 'push' only"),
])
def test_close_nights_is_refused_where_it_cannot_work(tmp_path: Path, settings_data: Any, rule: dict[str, Any],
                                                      says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        Settings(**settings_data(tmp_path, rule=rule))


def test_a_close_out_cut_short_after_the_dataset_was_closed_attaches_nothing_again(night: Night,
                                                                                    monkeypatch: Any) -> None:
    assert night.drive(night.add("a.fits", b"a" * 100).id).state is S.DELETED
    ds = night.dataset()
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    real = night.ledger.set_night

    def crash(rule: str, dataset: str, expect: str, state: str, **cols: Any) -> bool:
        if state == CLOSED:
            raise RetryableError("killed")
        return real(rule, dataset, expect, state, **cols)
    monkeypatch.setattr(night.ledger, "set_night", crash)
    [done] = night.run_at(ends + 2 * H)
    assert done["outcome"] == "failed"
    assert night.lake.dataset_closed("test", ds) and night.ledger.night_states("r", [ds]) == {ds: CLOSING}
    monkeypatch.undo()
    registered = []
    monkeypatch.setattr(night.lake, "register", lambda f: registered.append(f))
    [done] = night.run_at(ends + 3 * H)
    assert done["verdict"] == "complete" and registered == []


def test_the_runner_closes_nights_only_for_rules_that_ask_and_not_while_the_lake_is_down(
        tmp_path: Path, clock: Any, settings_data: Any) -> None:
    from edge_agent.ledger import Ledger
    from edge_agent.runner import Runner
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    for close, expect in ((False, None), (True, CloseOut)):
        s = Settings(**settings_data(tmp_path, rule={"close_nights": close}, nights_check_seconds=60))
        ledger = Ledger(s.ledger_path, clock=clock)
        r = Runner(s, ledger, build_catalogue(s), clock=clock, monotonic=clock)
        try:
            assert (r.close_out is None) if expect is None else isinstance(r.close_out, expect)
            if r.close_out is not None:
                ran: list[int] = []
                r.close_out.run = lambda now=None, ran=ran: ran.append(1) or []   # type: ignore[method-assign]
                r.lake_problem = "down"
                r.close_nights()
                r.lake_problem = None
                r.close_nights()
                assert ran == [1]
        finally:
            for pool in r.pools.values():
                pool.shutdown()
            ledger.close()


def test_a_file_retried_after_its_night_closed_is_not_quarantined_again(night: Night) -> None:
    """Review of issue 16 (4): a file quarantined after hashing (e.g. the lake refused its metadata) makes its night incomplete;
    the night closes; the operator fixes the cause and runs `edge-agent retry ID`. The version resumes at
    HASHED with dataset = the closed night: the register step attaches it to the closed dataset, is
    refused (PermanentError 'dataset is closed') and quarantines the file again: it can never be sent
    (it should go to <dataset>.late)."""
    good = night.add("good.fits", b"g" * 100)
    bad = night.add("bad.fits", b"b" * 100)
    assert night.drive(good.id).state is State.DELETED
    rec = night.drive(bad.id, until=State.HASHED)
    assert rec.state is State.HASHED
    night.ledger.transition(bad.id, State.HASHED, Event.FAILED_PERMANENT, {"reason": "lake refused metadata"},
                            reason="lake refused metadata")
    ds = night.dataset()
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    [done] = night.run_at(ends + 2 * H)
    assert done["verdict"] == "incomplete"
    # the operator's retry
    night.ledger.transition(bad.id, State.QUARANTINED, Event.OPERATOR_RETRY, {"by": "op"})
    end = night.drive(bad.id)
    assert end.state is State.DELETED, f"{end.state}: {end.reason}"
    assert end.dataset == ds + ".late"


def test_a_late_file_quarantined_before_hashing_closes_one_late_dataset_not_one_per_run(night: Night) -> None:
    """Review of issue 16 (3): night N is closed. Then a zero-byte file of N turns up (a failed write) and is quarantined
    before hashing (dataset NULL). _unhashed() keeps it (updated_at > N's closed_at) and files it under
    the first late dataset not open: .late, closed incomplete; next run .late2, closed incomplete with the
    same file; then .late3 ... each with a manifest uploaded and a dataset closed in the lake."""
    good = night.add("good.fits", b"g" * 100)
    assert night.drive(good.id).state is State.DELETED
    ds = night.dataset()
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    [done] = night.run_at(ends + 2 * H)
    assert done["verdict"] == "complete"
    night.clock.now = ends + 2.5 * H
    empty = night.add("empty.fits", b"")
    assert night.drive(empty.id).state is State.QUARANTINED
    closed = []
    for i in range(6):
        closed += [d["dataset"] for d in night.run_at(ends + (3 + i) * H) if d.get("outcome") == "closed"]
    assert len(closed) <= 1, f"the one quarantined late file closed {len(closed)} late datasets: {closed}"


def test_a_data_file_named_like_the_manifest_is_never_written_over(night: Night) -> None:
    """The last read of the change: a DAQ file whose DID is the night's manifest's name
    (`<dataset>.manifest.json`), delivered and deleted from the buffer; the close-out found it
    attached and put the manifest over its copies with may_replace. Its copies now stay."""
    ds = night.dataset()
    data = b"a data file, not a manifest " * 40
    clash = night.add(ds + core.MANIFEST_SUFFIX, data)
    assert night.drive(clash.id).state is State.DELETED
    copies = sorted(p for p in night.tmp.rglob(ds + core.MANIFEST_SUFFIX) if "lake" in str(p))
    assert copies and all(p.read_bytes() == data for p in copies)
    ends = core.night_end(ds[2:], 12, night.s.rules["r"].tz)
    [done] = night.run_at(ends + 2 * H)
    assert done["outcome"] == "failed" and "the night's manifest's name" in done["error"]
    assert all(p.read_bytes() == data for p in copies)                 # the data file's copies kept
