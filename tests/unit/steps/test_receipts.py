"""Custody receipts through the real steps (real ledger, real files, the in-memory catalogue): written
durably before the local file goes and never after, none for a file that is not safe in the lake,
the same content after a crash, hostile names, and never taken for data."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent import receipts as receipts_io
from edge_agent.core import receipts
from edge_agent.core.lifecycle import Event, State
from edge_agent.settings import Settings
from edge_agent.steps import StepContext, delete
from edge_agent.watch.filters import RuleFilter

from .test_steps import DATA, DID, Env, adler, make_env, register_env  # noqa: F401 (make_env: a fixture)

S, E = State, Event


class Killed(BaseException):
    """kill -9: nothing after it runs."""


def beside(env: Env, rel: str = "run42/f1.fits") -> Path:
    return env.daq / (rel + ".receipt")


def receipt_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())


# ---------------------------------------------------------------- content and order

def test_a_receipt_beside_the_file_says_what_the_lake_confirmed(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    rec = env.drive(env.add().id)
    assert rec.state is S.DELETED and not Path(rec.fspath).exists()
    doc = receipt_of(beside(env))
    assert doc["schema"] == receipts.SCHEMA and doc["status"] == "confirmed"
    assert (doc["rule"], doc["relpath"], doc["path"]) == ("r", "run42/f1.fits", rec.fspath)
    assert doc["did"] == DID and doc["dataset"] == f"test:{rec.dataset}"
    assert (doc["size"], doc["adler32"], doc["blake3"], doc["md5"]) == (len(DATA), adler(DATA), rec.blake3, None)
    assert doc["copies_required"] == 2
    assert [(r["location"], r["url"], r["size"], r["adler32"], r["state"]) for r in doc["replicas"]] == [
        (loc, str(env.copy(loc, rec)), len(DATA), adler(DATA), "AVAILABLE") for loc in ("a", "b")]
    assert doc["confirmed_at"] == receipts.iso(rec.confirmed_at) and doc["confirmed_at"].endswith("Z")
    assert doc["written_at"] == receipts.iso(clock.now)
    assert doc["local_copy"] == receipts.TO_DELETE
    assert doc["file"] == {"id": rec.id, "version": 1} and doc["agent"]["agent_id"] is None
    assert "path_hex" not in doc
    # the deletion names its receipt, and no temporary file is left
    assert env.ledger.history(rec.id)[-1]["detail"]["receipt"] == str(beside(env))
    assert sorted(os.listdir(beside(env).parent)) == ["f1.fits.receipt"]


def test_md5_is_in_the_receipt_when_the_rule_takes_it(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside", "md5": True})
    rec = env.drive(env.add().id)
    import hashlib
    assert receipt_of(beside(env))["md5"] == hashlib.md5(DATA).hexdigest() == rec.md5


def test_the_receipt_is_on_disk_before_the_unlink(make_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(rule={"receipts": "beside"})
    seen: list[bool] = []
    real = delete.guarded_unlink

    def unlink(*a: Any, **kw: Any) -> str:
        seen.append(beside(env).exists())
        return real(*a, **kw)
    monkeypatch.setattr(delete, "guarded_unlink", unlink)
    assert env.drive(env.add().id).state is S.DELETED
    assert seen == [True]


def test_a_receipt_that_cannot_be_written_keeps_the_file(make_env: Any, clock: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(rule={"receipts": "beside"})
    real = receipts_io._write_at

    def full(*a: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(receipts_io, "_write_at", full)
    rec = env.drive(env.add().id)
    assert rec.state is S.RETRY_WAIT and rec.resume_state is S.CONFIRMED
    assert Path(rec.fspath).read_bytes() == DATA and not beside(env).exists()
    assert "custody receipt" in (rec.reason or "") and "No space left" in (rec.reason or "")
    assert "deleted" not in env.events(rec.id)
    monkeypatch.setattr(receipts_io, "_write_at", real)    # room again: the retry writes it, then deletes
    env.retry_due(rec.id)
    assert env.step(rec.id).state is S.DELETED
    assert receipt_of(beside(env))["did"] == DID


def test_a_leftover_at_the_receipts_temporary_name_is_replaced_never_written_through(tmp_path: Path) -> None:
    """A leftover at the agent's temporary name that is a hard link to another file (a DAQ's, a
    backup tool's): the receipt is a new inode, and the other file keeps its bytes."""
    from edge_agent.localfs import LocalFile, temp_base
    daq = tmp_path / "daq.fits"
    daq.write_bytes(b"the DAQ's own bytes")
    os.link(daq, tmp_path / os.fsdecode(temp_base(b"f.fits.receipt", b"receipt.7")))
    receipts_io.write(LocalFile.below(tmp_path, os.fsencode(tmp_path / "f.fits.receipt")), b'{"did": "x"}', False, 7)
    assert daq.read_bytes() == b"the DAQ's own bytes"
    assert (tmp_path / "f.fits.receipt").read_bytes() == b'{"did": "x"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daq.fits", "f.fits.receipt"]


def test_a_receipts_directory_that_cannot_be_made_keeps_the_file(make_env: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "receipts"
    blocker.write_bytes(b"a file where the receipts directory should be")
    env = make_env(rule={"receipts": "directory", "receipts_directory": str(blocker)})
    rec = env.drive(env.add().id)
    assert rec.state is S.RETRY_WAIT and Path(rec.fspath).exists()
    assert "cannot write the custody receipt" in (rec.reason or "")
    blocker.unlink()
    env.retry_due(rec.id)
    assert env.step(rec.id).state is S.DELETED
    assert receipt_of(blocker / "run42" / "f1.fits.receipt")["did"] == DID


def test_a_crash_between_the_receipt_and_the_unlink_leaves_both_and_the_next_look_finishes(
        make_env: Any, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(rule={"receipts": "beside"})

    def die(name: str) -> None:
        if name == "after_receipt":
            raise Killed()
    monkeypatch.setattr(delete, "hit", die)
    with pytest.raises(Killed):
        env.drive(env.add().id)
    rec = env.ledger.get(1)
    assert rec.state is S.CONFIRMED and Path(rec.fspath).read_bytes() == DATA
    first = beside(env).read_bytes()
    doc = json.loads(first)
    assert doc["status"] == "confirmed" and doc["local_copy"] == receipts.TO_DELETE     # never "deleted"
    monkeypatch.undo()
    clock.advance(60)                      # the restart: written_at would differ if it were written again
    assert env.step(rec.id).state is S.DELETED
    assert beside(env).read_bytes() == first


def test_a_receipt_of_other_content_is_replaced_whole(make_env: Any) -> None:
    """An agent's receipt of an older version (a receipt, not a DAQ's file: see below) is replaced."""
    env = make_env(rule={"receipts": "beside"})
    beside(env).parent.mkdir(parents=True)
    older = receipts.document(receipts.Version(99, 1, "r", "run42/f1.fits", b"/x", "test", "old", None, 1, 1,
                                               "00000001", None, "b3", 1.0), [], 2, receipts.TO_DELETE, 1.0, "h",
                              None, "0")
    beside(env).write_bytes(receipts.encode(older))
    env.drive(env.add().id)
    assert receipt_of(beside(env))["did"] == DID


def test_a_temporary_receipt_left_by_a_crash_mid_write_is_overwritten_not_left(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    rec = env.add()
    left = env.daq / "run42" / f".f1.fits.receipt.edge-agent-receipt.{rec.id}"
    left.write_bytes(b'{"cut sh')
    assert env.drive(rec.id).state is S.DELETED
    assert not left.exists() and receipt_of(beside(env))["did"] == DID
    assert sorted(os.listdir(env.daq / "run42")) == ["f1.fits.receipt"]


# ---------------------------------------------------------------- where receipts go

def test_a_receipts_directory_mirrors_the_subdirectories(make_env: Any, tmp_path: Path) -> None:
    rdir = tmp_path / "receipts"
    env = make_env(rule={"receipts": "directory", "receipts_directory": str(rdir)})
    a = env.drive(env.add("run42/deep/er/f1.fits").id)
    b = env.drive(env.add("top.fits", DATA + b"x").id)
    assert (a.state, b.state) == (S.DELETED, S.DELETED)
    assert receipt_of(rdir / "run42" / "deep" / "er" / "f1.fits.receipt")["relpath"] == "run42/deep/er/f1.fits"
    assert receipt_of(rdir / "top.fits.receipt")["size"] == len(DATA) + 1
    assert not list(env.daq.rglob("*.receipt"))       # nothing in the watched tree


def test_no_receipts_unless_the_rule_asks(make_env: Any, tmp_path: Path) -> None:
    env = make_env()
    rec = env.drive(env.add().id)
    assert rec.state is S.DELETED
    assert not list(tmp_path.rglob("*.receipt"))
    assert "receipt" not in env.ledger.history(rec.id)[-1]["detail"]


def test_a_receipts_directory_reached_through_a_symlink_below_it_is_not_followed(make_env: Any,
                                                                                   tmp_path: Path) -> None:
    rdir = tmp_path / "receipts"
    elsewhere = tmp_path / "elsewhere"
    rdir.mkdir()
    elsewhere.mkdir()
    (rdir / "run42").symlink_to(elsewhere)
    env = make_env(rule={"receipts": "directory", "receipts_directory": str(rdir)})
    rec = env.drive(env.add().id)
    assert rec.state is not S.DELETED and Path(rec.fspath).exists()
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------- when: none for a file not safe in the lake

def test_no_receipt_before_confirmation(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    rec = env.add()
    for _ in range(4):                    # hashed, registered, copied, transferred
        rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED
    assert not beside(env).exists()


def test_no_receipt_while_the_lake_does_not_confirm(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    rec = env.add()
    rec = env.drive(rec.id, max_steps=4)
    env.copy("b", rec).unlink()           # a copy lost before confirmation: written again, not confirmed
    rec = env.step(rec.id)
    assert rec.state is not S.CONFIRMED and not beside(env).exists()


def test_no_receipt_for_a_quarantined_file(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    rec = env.drive(env.add("run42/f1.fits", b"").id)
    assert rec.state is S.QUARANTINED and not beside(env).exists()


def test_no_receipt_for_a_file_still_open_for_writing(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    writers: dict[tuple[int, int], int] = {}
    env.ctx = StepContext(env.s, env.ledger, env.lake, env.transports, pace=lambda n: None, clock=clock,
                          rand=lambda: 0.5, open_writers=lambda dev, ino: writers.get((dev, ino), 0))
    rec = env.add()
    st = os.stat(rec.fspath)
    writers[(st.st_dev, st.st_ino)] = 1
    rec = env.drive(rec.id)
    assert rec.state is S.CONFIRMED and not beside(env).exists()
    writers.clear()
    clock.advance(env.s.confirm_interval_seconds)
    assert env.step(rec.id).state is S.DELETED and beside(env).exists()


def test_no_receipt_for_a_file_changed_after_hashing(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    rec = env.add()
    rec = env.drive(rec.id, max_steps=4)
    Path(rec.fspath).write_bytes(DATA + b"more")
    end = env.drive(rec.id)
    assert end.state is S.SUPERSEDED and not beside(env).exists()


def test_a_kept_file_has_its_receipt_as_soon_as_it_is_confirmed(make_env: Any, clock: Any) -> None:
    """delete = "never": the DAQ hears the file is safe at once; the receipt says it is kept, and an
    hourly look rewrites nothing."""
    env = make_env(rule={"receipts": "beside", "delete": "never"})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED and Path(rec.fspath).exists()
    first = beside(env).read_bytes()
    assert json.loads(first)["local_copy"] == receipts.KEPT
    clock.advance(3600)
    assert env.step(rec.id).state is S.CONFIRMED
    assert beside(env).read_bytes() == first


def test_a_keep_period_writes_the_receipt_at_confirmation_and_again_before_the_deletion(
        make_env: Any, clock: Any) -> None:
    env = make_env(rule={"receipts": "beside", "delete": "keep", "keep_hours": 2})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    assert receipt_of(beside(env))["local_copy"] == receipts.KEPT
    clock.advance(2 * 3600)
    assert env.step(rec.id).state is S.DELETED
    doc = receipt_of(beside(env))
    assert doc["local_copy"] == receipts.TO_DELETE and doc["confirmed_at"] == receipts.iso(rec.confirmed_at)


def test_a_dry_run_writes_receipts_and_deletes_nothing(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside"}, dry_run=True)
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED and Path(rec.fspath).exists()
    assert receipt_of(beside(env))["local_copy"] == receipts.KEPT


def test_a_file_removed_by_someone_else_after_confirmation_gets_its_receipt(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"receipts": "beside", "delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    os.unlink(rec.fspath)
    clock.advance(3600)
    assert env.step(rec.id).state is S.DELETED
    assert receipt_of(beside(env))["local_copy"] == receipts.TO_DELETE


def test_beside_a_file_whose_directory_went_too_no_directory_is_made(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"receipts": "beside", "delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    os.unlink(rec.fspath)
    os.unlink(beside(env))
    os.rmdir(env.daq / "run42")
    clock.advance(3600)
    assert env.step(rec.id).state is S.DELETED
    assert not (env.daq / "run42").exists()
    assert env.ledger.history(rec.id)[-1]["detail"]["receipt"] is None


def test_register_in_place_lists_the_lake_copies_not_the_buffer(make_env: Any) -> None:
    env = register_env(make_env)
    env.s.rules["r"].receipts = "beside"
    rec = env.drive(env.add().id)
    assert rec.state is S.DELETED
    doc = receipt_of(beside(env))
    assert [r["location"] for r in doc["replicas"]] == ["L1", "L2"]
    assert [r["url"] for r in doc["replicas"]] == [f"root://L1//lake/{DID}", f"root://L2//lake/{DID}"]


# ---------------------------------------------------------------- hostile names

def test_a_long_name_gets_a_receipt_name_within_the_limit(make_env: Any, tmp_path: Path) -> None:
    rdir = tmp_path / "receipts"
    env = make_env(rule={"receipts": "directory", "receipts_directory": str(rdir), "name_template": "long.fits"})
    name = "n" * 250 + ".fits"
    rec = env.drive(env.add(name).id)
    assert rec.state is S.DELETED
    [got] = os.listdir(rdir)
    assert len(os.fsencode(got)) <= 255 and got.endswith(".receipt")
    assert os.fsencode(got) == receipts.receipt_name(os.fsencode(name))
    assert receipt_of(rdir / got)["relpath"] == name


def test_a_long_name_beside_is_skipped_by_the_watcher(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside", "name_template": "long.fits"})
    name = "n" * 248 + ".fits"
    env.drive(env.add(name).id)
    [got] = [n for n in os.listdir(env.daq)]
    assert RuleFilter(env.s.rules["r"])(got) is not None


def test_an_undecodable_name_gets_its_receipt_and_its_bytes(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside", "name_template": "odd.fits"})
    raw = os.fsencode(env.daq) + b"/caf\xe9.fits"
    with open(raw, "wb") as fh:
        fh.write(DATA)
    st = os.stat(raw)
    rec = env.ledger.discover("r", raw, "caf\\xe9.fits", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
    env.ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED)
    assert env.drive(rec.id).state is S.DELETED
    with open(raw + b".receipt", "rb") as fh:
        doc = json.loads(fh.read())
    assert doc["relpath"] == "caf\\xe9.fits" and doc["path"].endswith("caf\\xe9.fits")
    assert bytes.fromhex(doc["path_hex"]) == raw


# ---------------------------------------------------------------- never data

def test_receipts_beside_the_files_are_never_taken_for_data(make_env: Any) -> None:
    env = make_env(rule={"receipts": "beside"})
    f = RuleFilter(env.s.rules["r"])
    assert f("run42/f1.fits.receipt") is not None and f("run42/f1.fits") is None
    assert f("run42/." + "f1.fits.receipt" + ".edge-agent-receipt.0123") is not None     # its temporary name
    plain = RuleFilter(make_env().s.rules["r"])
    assert plain("run42/f1.fits.receipt") is None       # a rule without receipts takes such a name as data


def test_a_rescan_after_the_deletion_takes_no_receipt(make_env: Any) -> None:
    from edge_agent.watch.scanner import walk
    env = make_env(rule={"receipts": "beside"})
    env.drive(env.add().id)
    f = RuleFilter(env.s.rules["r"])
    found = [e.relpath for e in walk(os.fsencode(env.daq), True) if not e.problem and f(e.relpath) is None]
    assert found == []


def test_a_daq_file_with_the_receipts_name_is_never_written_over(make_env: Callable[..., Env]) -> None:
    """Review of issue 16 (1): the DAQ's own file f1.fits.receipt was renamed over by the agent's
    receipt of f1.fits (never sent, its bytes gone). It is kept; f1.fits is kept too, and said why."""
    env = make_env(rule={"receipts": "beside"})
    rec = env.add()
    theirs = env.daq / "run42" / "f1.fits.receipt"
    theirs.write_bytes(b"\x00a DAQ calibration table\x00" * 100)
    end = env.drive(rec.id)
    assert end.state is State.QUARANTINED and "is not a custody receipt of edge-agent's" in (end.reason or "")
    assert theirs.read_bytes().startswith(b"\x00a DAQ") and (env.daq / "run42" / "f1.fits").read_bytes() == DATA
    # moved away by a person, then retried: the receipt is written and the file goes
    theirs.rename(env.daq / "run42" / "f1-calibration.dat")
    env.ledger.transition(rec.id, State.QUARANTINED, Event.OPERATOR_RETRY, {"by": "test"}, next_at=0)
    end = env.drive(rec.id)
    assert end.state is State.DELETED and receipts.is_receipt(theirs.read_bytes())


def test_a_daq_file_named_like_a_receipt_is_reported_not_skipped_without_a_word(
        tmp_path: Path, clock: Any, settings_data: Callable[..., dict[str, Any]]) -> None:
    """Review of issue 16 (5): `*.receipt` names are the agent's with receipts = beside; one that is
    not an agent's receipt is data the agent will not send: a notice says so (once)."""
    from edge_agent.app import build_catalogue
    from edge_agent.ledger import Ledger
    from edge_agent.runner import Runner
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir(exist_ok=True)
    s = Settings(**settings_data(tmp_path, rule={"receipts": "beside", "completion": ["renamed"]}))
    r = Runner(s, Ledger(s.ledger_path, clock=clock), build_catalogue(s), clock=clock)
    try:
        (tmp_path / "daq" / "spectra.receipt").write_bytes(b"not json at all")
        good = receipts.document(receipts.Version(1, 1, "r", "x", b"/x", "s", "x", None, 1, 1, "00000001", None,
                                                 "b3", 1.0), [], 2, receipts.TO_DELETE, 1.0, "h", None, "0")
        (tmp_path / "daq" / "x.receipt").write_bytes(receipts.encode(good))
        r.discovery.rescan("r")
        r.discovery.rescan("r")
        notes = [n for n in r.ledger.notices() if n["kind"] == "not-a-receipt"]
        assert [os.path.basename(n["relpath"]) for n in notes] == ["spectra.receipt"] and notes[0]["count"] == 1
        assert list(r.ledger.iter_all()) == []           # neither is taken for data
    finally:
        for pool in r.pools.values():
            pool.shutdown()
        r.ledger.close()
