"""The steps with a real ledger and real files, behind the shipped in-memory catalogue.

The catalogue is lake/memory.py's MemoryCatalogue, as the local lake: the agent writes the copies
(roots in tmp_path), and only the storage says whether a copy is there. Copies go through a real
PosixTransport mounted at each destination's directory where a test looks at files on disk (posix
no-clobber, temp files); a test about what storage answers (a lying stat, a partial object, bytes
no one can prove) mounts the shipped MockTransport there instead and tells it how to misbehave.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge_agent import steps
from edge_agent.core.lifecycle import Event, State
from edge_agent.core.policy import PATH_NAME_RE
from edge_agent.errors import PermanentError, RetryableError, SymlinkInPath
from edge_agent.lake.base import CopiesState, LakeFile
from edge_agent.lake.memory import Call, MemoryCatalogue
from edge_agent.ledger import FileRecord
from edge_agent.localfs import Source, is_agent_temp
from edge_agent.settings import DeletePolicy, Settings
from edge_agent.steps import Hooks, StepContext
from edge_agent.steps.failures import MAX_BAD_COPIES, MAX_UNEXPECTED
from edge_agent.transfer.base import RemoteStat, Transport
from edge_agent.transfer.mock import MockTransport
from edge_agent.transfer.posix import PosixTransport
from edge_agent.transfer.registry import Transports

from ..ledgers import open_ledger

S, E = State, Event
WORKING = (S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED)
DATA = b"DAQ frame: not a real FITS file, just bytes to move\n" * 500
DID = "test:run42/f1.fits"
T = TypeVar("T", bound=Transport)
RUCIO: dict[str, Any] = {"kind": "rucio", "rucio": {"url": "http://rucio.test", "account": "root",
                                                     "auth": {"type": "userpass", "username": "u", "password": "p"}}}


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class Env:
    def __init__(self, tmp: Path, clock: Any, settings: Settings) -> None:
        self.tmp, self.clock, self.s = tmp, clock, settings
        self.daq = tmp / "daq"
        self.daq.mkdir(exist_ok=True)
        self.roots = {"a": tmp / "lake-a", "b": tmp / "lake-b"}
        for r in self.roots.values():
            r.mkdir(exist_ok=True)
        self.ledger = open_ledger(settings.ledger_path, clock=clock)
        # as the local lake: copies go to root/scope/name, and the storage alone says a copy is there
        self.lake = MemoryCatalogue({loc: str(root) for loc, root in self.roots.items()}, PATH_NAME_RE,
                                    listed=False)
        self.transports = Transports()
        self.use(PosixTransport(fsync=False))
        self.hashed: list[int] = []
        self.sent: dict[str, int] = {}
        hooks = Hooks(bytes_hashed=lambda rule, n: self.hashed.append(n),
                      bytes_sent=lambda rule, loc, n: self.sent.__setitem__(loc, self.sent.get(loc, 0) + n))
        self.ctx = StepContext(settings, self.ledger, self.lake, self.transports, pace=lambda n: None, hooks=hooks,
                               clock=clock, rand=lambda: 0.5, monotonic=clock)

    def use(self, transport: T) -> T:
        """From now on every destination's copies go through `transport` (mounted at its root)."""
        for root in self.roots.values():
            self.transports.mount(str(root), transport)
        return transport

    def add(self, rel: str = "run42/f1.fits", data: bytes = DATA) -> FileRecord:
        """A file the watcher found and judged complete."""
        p = self.daq / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        st = os.stat(p)
        rec = self.ledger.discover("r", os.fsencode(p), rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
        return self.ledger.transition(rec.id, S.DISCOVERED, E.COMPLETED)

    def step(self, fid: int) -> FileRecord:
        steps.run([self.ledger.get(fid)], self.ctx)
        return self.ledger.get(fid)

    def drive(self, fid: int, max_steps: int = 12) -> FileRecord:
        """Run steps until the file leaves the working states or a step does not move it."""
        rec = self.ledger.get(fid)
        for _ in range(max_steps):
            if rec.state not in WORKING:
                return rec
            new = self.step(fid)
            if new.state is rec.state:
                return new
            rec = new
        return rec

    def retry_due(self, fid: int) -> FileRecord:
        """What the runner does when a backoff is over."""
        rec = self.ledger.get(fid)
        assert rec.state is S.RETRY_WAIT
        self.clock.now = max(self.clock.now, rec.next_at)
        return self.ledger.transition(fid, S.RETRY_WAIT, E.RETRY_DUE)

    def copy(self, loc: str, rec: FileRecord) -> Path:
        return self.roots[loc] / str(rec.scope) / str(rec.name)

    def url(self, loc: str, rec: FileRecord) -> str:
        """The URL of `loc`'s copy, as the catalogue names it (a key of a MockTransport's objects)."""
        return str(self.copy(loc, rec))

    def events(self, fid: int) -> list[str]:
        return [h["event"] for h in self.ledger.history(fid)]


@pytest.fixture
def make_env(tmp_path: Path, clock: Any, settings_data: Callable[..., dict[str, Any]]
             ) -> Any:
    envs: list[Env] = []

    def make(rule: dict[str, Any] | None = None, **top: Any) -> Env:
        env = Env(tmp_path, clock, Settings(**settings_data(tmp_path, rule=rule, **top)))
        envs.append(env)
        return env
    yield make
    for e in envs:
        e.ledger.close()


@pytest.fixture
def env(make_env: Any) -> Env:
    return make_env()


# ---------------------------------------------------------------- the happy path

def test_happy_path_complete_to_deleted(env: Env, clock: Any) -> None:
    rec = env.add()
    local = Path(rec.fspath)
    end = env.drive(rec.id)
    assert end.state is S.DELETED
    assert not local.exists()
    assert (end.size, end.adler32, end.did, end.version) == (len(DATA), adler(DATA), "test:run42/f1.fits", 1)
    assert end.deleted_at == clock.now and end.confirmed_at == clock.now
    for loc in ("a", "b"):
        assert env.copy(loc, end).read_bytes() == DATA
    # the first copy is written in the hashing pass: each byte is read once per copy
    assert env.events(rec.id) == ["discovered", "completed", "copy_written", "hashed", "registered",
                                  "copy_written", "copied", "transferred", "confirmed", "deleted"]
    assert [(r["location"], r["state"]) for r in env.ledger.replicas(rec.id)] == [("a", "written"),
                                                                                 ("b", "written")]
    assert set(env.lake.dids) == {"test:run42/f1.fits"}
    assert env.lake.dids["test:run42/f1.fits"].dataset and env.lake.dids["test:run42/f1.fits"].dataset.startswith("r.")
    assert env.lake.released == [DID]
    assert env.lake.asked("release") == [Call("release", DID)]               # asked once each
    assert env.lake.asked("request_copies") == [Call("request_copies", DID)]
    assert sum(env.hashed) == len(DATA) and env.sent == {"a": len(DATA), "b": len(DATA)}
    # the deletion is recorded with its evidence
    deleted = env.ledger.history(rec.id)[-1]["detail"]
    assert deleted["outcome"] == "deleted" and len(deleted["replicas"]) == 2
    assert {r["adler32"] for r in deleted["replicas"]} == {adler(DATA)}


def test_each_step_is_one_transition(env: Env) -> None:
    rec = env.add()
    states = [env.step(rec.id).state for _ in range(5)]
    assert states == [S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.DELETED]  # confirm deletes at once


def test_a_copy_written_last_commits_with_the_move_that_follows_it(env: Env) -> None:
    """Hashing commits twice (the reservation; first copy + hashed), not three times, and the other
    copies three times (the writer's claim; 'writing'; copy + copied), not four: the copy's record
    and the move share a commit."""
    rec = env.add()
    before = env.ledger._writes.commits
    env.step(rec.id)
    assert env.ledger._writes.commits - before == 2
    env.step(rec.id)                                   # registered
    before = env.ledger._writes.commits
    assert env.step(rec.id).state is S.COPIED
    assert env.ledger._writes.commits - before == 3
    assert [(r["location"], r["state"]) for r in env.ledger.replicas(rec.id)] == [("a", "sent"), ("b", "sent")]


def test_a_move_that_fails_records_no_copy_and_the_step_still_ends_right(env: Env,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's record and the move commit together: a move that fails (here: the ledger says no
    once) leaves the written copy as a crash right after the write would, and the next attempt
    counts it without writing another."""
    from edge_agent.errors import LedgerUnwritable
    rec = env.drive(env.add().id, max_steps=2)
    assert rec.state is S.REGISTERED
    real = env.ledger.transition
    calls = {"n": 0}

    def once(*a: Any, **k: Any) -> Any:
        if a[2] is E.COPIED and not calls["n"]:
            calls["n"] += 1
            raise LedgerUnwritable("the ledger l.sqlite cannot be written: database or disk is full")
        return real(*a, **k)

    monkeypatch.setattr(env.ledger, "transition", once)
    with pytest.raises(LedgerUnwritable):
        env.step(rec.id)
    assert env.ledger.get(rec.id).state is S.REGISTERED
    assert {r["location"]: r["state"] for r in env.ledger.replicas(rec.id)}["b"] == "writing"
    assert env.copy("b", rec).read_bytes() == DATA
    assert env.drive(rec.id).state is S.DELETED
    assert env.copy("b", rec).read_bytes() == DATA


def test_a_crash_after_a_copy_repeats_only_what_is_missing(env: Env) -> None:
    rec = env.drive(env.add().id, max_steps=2)
    assert rec.state is S.REGISTERED
    # as if the agent died after writing copy a and recording it
    f = env.ctx.lake_file(rec)
    env.roots["a"].joinpath("test/run42").mkdir(parents=True, exist_ok=True)
    env.copy("a", rec).write_bytes(DATA)
    env.lake.add_replica(f, "a", str(env.copy("a", rec)))
    env.ledger.record_replica(rec.id, "a", str(env.copy("a", rec)), len(DATA), adler(DATA), "written")
    env.sent.clear()
    assert env.drive(rec.id).state is S.DELETED
    assert env.sent == {"b": len(DATA)}


def test_metadata_and_sidecar(make_env: Any) -> None:
    env = make_env(rule={"completion": ["sidecar"], "metadata": {"telescope": "LST-1"}})
    rec = env.add("f1.fits")
    sidecar = Path(rec.fspath + ".json")
    sidecar.write_text(json.dumps({"run": 42, "telescope": "LST-2"}))
    rec = env.step(rec.id)
    assert rec.meta == {"telescope": "LST-2", "run": 42}     # the sidecar wins over the rule
    assert env.drive(rec.id).state is S.DELETED
    assert not sidecar.exists()                              # companions go with the data file


def test_a_rewritten_file_gets_a_versioned_name(env: Env) -> None:
    first = env.drive(env.add("f1.fits", b"first night").id)
    assert first.state is S.DELETED and first.name == "f1.fits"
    second = env.drive(env.add("f1.fits", b"second, different night").id)
    assert second.state is S.DELETED
    assert (second.version, second.name) == (2, "f1.fits.v2")
    assert env.copy("a", first).read_bytes() == b"first night"   # the first version's copy is intact


def test_the_evidence_says_where_each_adler32_came_from(make_env: Any) -> None:
    # verify_upload = "size": a storage without checksums vouches for the size; the adler32 that
    # counts is the catalogue's, i.e. the agent's own number. The copy counts as before; the
    # confirmation and the deletion record which copies stood on that.
    env = make_env(lake=RUCIO | {"rucio": RUCIO["rucio"] | {"verify_upload": "size"}},
                   destinations={"a": {"kind": "rse", "rse": "A"}, "b": {"kind": "rse", "rse": "B"}})
    env.lake.listed = True                    # as Rucio: each copy recorded with the agent's size and adler32
    b = MockTransport(verify_upload="size")
    env.transports.mount(str(env.roots["b"]), b)
    rec = env.drive(env.add().id, max_steps=4)
    assert rec.state is S.TRANSFERRED
    b.lie(env.url("b", rec), RemoteStat(len(DATA), None))    # b's storage answers the size alone
    assert env.drive(rec.id).state is S.DELETED
    details = {h["event"]: h["detail"] for h in env.ledger.history(rec.id)}
    for event in ("confirmed", "deleted"):
        assert {r["location"]: r["adler32_from_catalogue"] for r in details[event]["replicas"]} == \
            {"a": False, "b": True}


# ---------------------------------------------------------------- evidence that does not hold

def lie_about_both_copies(env: Env, stat: Callable[[int, str], RemoteStat]) -> FileRecord:
    """Both copies written, then their storage answers `stat(size, adler32)` for each, for good."""
    storage = env.use(MockTransport())
    rec = env.drive(env.add().id, max_steps=4)
    assert rec.state is S.TRANSFERRED and {r["state"] for r in env.ledger.replicas(rec.id)} == {"written"}
    for loc in ("a", "b"):
        storage.lie(env.url(loc, rec), stat(len(DATA), adler(DATA)))
    return rec


def test_a_lying_storage_is_never_trusted(env: Env) -> None:
    rec = lie_about_both_copies(env, lambda size, _: RemoteStat(size, "deadbeef"))
    local = Path(rec.fspath)
    for _ in range(10):
        rec = env.drive(rec.id)
        assert rec.state is not S.DELETED
        assert local.read_bytes() == DATA
        if rec.state is not S.RETRY_WAIT:
            break
        env.retry_due(rec.id)
    assert rec.state in (S.RETRY_WAIT, S.QUARANTINED, S.TRANSFERRED)
    bad = [r for r in env.ledger.replicas(rec.id) if r["state"] == "bad"]
    assert {r["location"] for r in bad} == {"a", "b"}
    assert "confirmed" not in env.events(rec.id)


def test_a_lying_storage_is_rewritten_a_bounded_number_of_times(env: Env) -> None:
    # steps/failures.py: "A destination that keeps handing back a wrong checksum is not tried forever"
    rec = lie_about_both_copies(env, lambda size, _: RemoteStat(size, "deadbeef"))
    for _ in range(MAX_BAD_COPIES + 3):
        rec = env.drive(rec.id)
        if rec.state is not S.RETRY_WAIT:
            break
        env.retry_due(rec.id)
    assert rec.state is S.QUARANTINED
    assert rec.reason and "keep failing verification" in rec.reason
    assert Path(rec.fspath).read_bytes() == DATA


def test_a_lying_lake_that_replicates_itself_makes_the_file_wait(env: Env, clock: Any) -> None:
    rec = lie_about_both_copies(env, lambda size, adler32: RemoteStat(size + 1, adler32))
    env.lake.writes_copies = False            # e.g. Rucio: the lake makes the copies, nothing to rewrite
    rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED
    assert rec.next_at == clock.now + env.s.confirm_interval_seconds
    assert Path(rec.fspath).exists()


def test_replicas_are_checked_again_before_deleting(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    env.copy("b", rec).write_bytes(b"rotted" + DATA[6:])     # a copy goes bad during the keep period
    clock.advance(3600)
    rec = env.step(rec.id)
    # kept, and the bad copy is written again from the buffer (item 8: it used to wait forever)
    assert rec.state is S.RETRY_WAIT and rec.resume_state is S.REGISTERED and Path(rec.fspath).exists()
    assert "replica_lost" in env.events(rec.id)
    env.retry_due(rec.id)
    rec = env.drive(rec.id)
    assert rec.state is S.CONFIRMED and env.copy("b", rec).read_bytes() == DATA
    clock.advance(3600)
    assert env.drive(rec.id).state is S.DELETED


def test_a_copy_gone_before_confirmation_is_written_again(env: Env) -> None:
    """Item 8: a local-lake copy that vanishes after it was written no longer leaves the file
    'transferred' forever: it is reported and written again from the buffer."""
    rec = env.add()
    for _ in range(4):
        rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED
    env.copy("a", rec).unlink()
    rec = env.step(rec.id)
    assert rec.state is S.RETRY_WAIT and rec.reason and "copy lost" in rec.reason
    assert [(r["location"], r["state"]) for r in env.ledger.replicas(rec.id)] == [("a", "lost"), ("b", "written")]
    env.retry_due(rec.id)
    end = env.drive(rec.id)
    assert end.state is S.DELETED and env.copy("a", end).read_bytes() == DATA


def test_copies_that_keep_vanishing_end_in_quarantine(env: Env) -> None:
    rec = env.add()
    for _ in range(4):
        rec = env.step(rec.id)
    for _ in range(MAX_BAD_COPIES):
        assert rec.state is S.TRANSFERRED
        env.copy("a", rec).unlink()
        rec = env.step(rec.id)                      # confirm: the copy is gone
        if rec.state is S.RETRY_WAIT:
            env.retry_due(rec.id)
            rec = env.step(rec.id)                  # transfer: written again
            rec = env.step(rec.id)                  # record: in the catalogue again
    assert rec.state is S.QUARANTINED and Path(rec.fspath).exists()


def test_the_local_lake_has_a_deadline(env: Env, clock: Any) -> None:
    env.lake.listed = True
    env.lake.unavailable = {"a"}              # the catalogue lists a's copy as not usable (yet)
    rec = env.add()
    for _ in range(4):
        rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED and rec.reason is None
    clock.advance(env.s.lake.stuck_after_hours * 3600 + 1)
    rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED and rec.reason and "1 of 2 replicas confirmed" in rec.reason
    assert "stuck" in env.events(rec.id) and Path(rec.fspath).exists()


def test_a_file_modified_after_hashing_is_superseded(env: Env) -> None:
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED
    local = Path(rec.fspath)
    local.write_bytes(DATA.replace(b"DAQ", b"QAD"))          # same size, other bytes
    rec = env.drive(rec.id)
    assert rec.state is S.SUPERSEDED
    assert rec.reason and "changed since it was hashed" in rec.reason
    assert local.read_bytes() == DATA.replace(b"DAQ", b"QAD")  # never deleted
    # no copy was left in the lake under the final name: the first copy, written while hashing,
    # was never recorded in the lake and is removed with the version it belonged to
    assert not env.copy("a", rec).exists() and not env.copy("b", rec).exists()
    assert env.lake.asked("add_replica") == []
    assert env.ledger.live("r", rec.path) is None             # the watcher will discover a new version


def test_a_file_modified_after_confirmation_is_superseded_not_deleted(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    local = Path(rec.fspath)
    with open(local, "ab") as fh:
        fh.write(b"appended after the copies were made")
    clock.advance(3600)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED
    assert local.exists() and local.read_bytes().endswith(b"appended after the copies were made")


def rewrite_keeping_size_and_mtime(path: str, data: bytes) -> None:
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))    # touch -d: the mtime put back


def test_hashing_records_ctime_and_device(env: Env) -> None:
    rec = env.add()
    st = os.stat(rec.fspath)
    rec = env.step(rec.id)
    assert rec.state is S.HASHED and (rec.ctime_ns, rec.dev) == (st.st_ctime_ns, st.st_dev)


def test_a_same_size_rewrite_with_its_mtime_put_back_is_not_deleted(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    rewrite_keeping_size_and_mtime(rec.fspath, b"REWRITTEN")   # inode, size and mtime as hashed
    clock.advance(3600)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED
    assert Path(rec.fspath).read_bytes() == b"REWRITTEN" + DATA[9:]


def forget_ctime(env: Env, fid: int) -> None:
    """The row as an agent without the ctime column hashed it."""
    env.ledger._db.execute("UPDATE files SET ctime_ns = NULL WHERE id = ?", (fid,))


@pytest.mark.parametrize("recheck", [False, True])
def test_recheck_before_delete_reads_what_the_stat_cannot_tell(make_env: Any, clock: Any, recheck: bool) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1, "recheck_before_delete": recheck})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    forget_ctime(env, rec.id)                    # hashed by an older agent: inode, size, mtime decide
    rewrite_keeping_size_and_mtime(rec.fspath, b"REWRITTEN")
    clock.advance(3600)
    rec = env.step(rec.id)
    if recheck:
        assert rec.state is S.SUPERSEDED and "changed just before deletion" in (rec.reason or "")
        assert Path(rec.fspath).read_bytes() == b"REWRITTEN" + DATA[9:]
    else:
        assert rec.state is S.DELETED            # the documented limit of a row without ctime


def test_recheck_before_delete_deletes_an_unchanged_file(make_env: Any) -> None:
    env = make_env(rule={"recheck_before_delete": True})
    rec = env.drive(env.add().id)
    assert rec.state is S.DELETED and not os.path.lexists(rec.fspath)


def swap_for_symlink(env: Env, rec: FileRecord) -> Path:
    """run42/ is renamed away and replaced by a symlink to a directory holding a file of the same name."""
    outside = env.tmp / "outside"
    outside.mkdir()
    (outside / "f1.fits").write_bytes(DATA)
    os.rename(env.daq / "run42", env.daq / "run42.moved")
    os.symlink(outside, env.daq / "run42")
    return outside / "f1.fits"


def test_a_directory_swapped_for_a_symlink_before_hashing(env: Env) -> None:
    rec = env.add()
    outside = swap_for_symlink(env, rec)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED and "symbolic link" in (rec.reason or "")
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))
    assert outside.read_bytes() == DATA


def test_a_directory_swapped_for_a_symlink_before_the_other_copies(env: Env) -> None:
    rec = env.step(env.step(env.add().id).id)
    assert rec.state is S.REGISTERED
    outside = swap_for_symlink(env, rec)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED and "symbolic link" in (rec.reason or "")
    assert not env.copy("b", rec).exists()                 # nothing read through the link
    assert outside.read_bytes() == DATA


def test_a_directory_swapped_for_a_symlink_before_deletion(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    # the directory is moved out of the tree and linked back: the very file, now outside the tree
    archive = env.tmp / "archive"
    archive.mkdir()
    os.rename(env.daq / "run42", archive / "run42")
    os.symlink(archive / "run42", env.daq / "run42")
    clock.advance(3600)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED and "symbolic link" in (rec.reason or "")
    assert (archive / "run42" / "f1.fits").read_bytes() == DATA
    assert env.lake.released == []


def test_a_file_changed_before_hashing_goes_back_to_discovered(env: Env) -> None:
    rec = env.add()
    with open(rec.fspath, "ab") as fh:
        fh.write(b"still writing")
    rec = env.step(rec.id)
    assert rec.state is S.DISCOVERED and rec.blake3 is None


def test_a_file_gone_before_hashing_is_superseded(env: Env) -> None:
    rec = env.add()
    os.unlink(rec.fspath)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED and rec.reason and "vanished" in rec.reason


def test_a_file_gone_before_its_copies_is_superseded_and_reported(env: Env) -> None:
    # renamed (its new name is a file of its own) or removed: retrying cannot bring it back
    rec = env.drive(env.add().id, max_steps=2)
    assert rec.state is S.REGISTERED
    os.unlink(rec.fspath)
    rec = env.step(rec.id)
    assert rec.state is S.SUPERSEDED
    assert rec.reason and "vanished" in rec.reason
    assert any(e["reason"] and "vanished" in e["reason"] for e in env.ledger.recent_errors())


# ---------------------------------------------------------------- failures

def test_retryable_register_error_waits_with_backoff(env: Env, clock: Any) -> None:
    env.lake.fail("register", times=None, error=RetryableError("lake answered 503"))
    rec = env.drive(env.add().id)
    assert rec.state is S.RETRY_WAIT
    assert (rec.resume_state, rec.attempts, rec.reason) == (S.HASHED, 1, "lake answered 503")
    assert rec.next_at > clock.now
    assert rec.next_at == clock.now + env.s.retry.base_seconds    # rand = 0.5: no jitter
    assert env.ledger.history(rec.id)[-1]["detail"]["retry_in_s"] == env.s.retry.base_seconds
    # the second failure waits twice as long
    env.retry_due(rec.id)
    rec = env.step(rec.id)
    assert rec.attempts == 2 and rec.next_at == clock.now + 2 * env.s.retry.base_seconds
    # the lake is back
    env.lake.heal()
    env.retry_due(rec.id)
    rec = env.drive(rec.id)
    assert rec.state is S.DELETED and rec.attempts == 0 and rec.reason is None


def test_permanent_register_error_quarantines_with_the_reason(env: Env) -> None:
    env.lake.fail("register", times=None, error=PermanentError("DID test:run42/f1.fits exists with other content"))
    rec = env.drive(env.add().id)
    assert rec.state is S.QUARANTINED
    assert rec.reason == "DID test:run42/f1.fits exists with other content"
    assert rec.resume_state is S.HASHED
    assert Path(rec.fspath).read_bytes() == DATA
    # the operator fixes it and retries
    env.lake.heal()
    env.ledger.transition(rec.id, S.QUARANTINED, E.OPERATOR_RETRY)
    assert env.drive(rec.id).state is S.DELETED


def test_unexpected_errors_are_retried_then_quarantined(env: Env) -> None:
    env.lake.fail("register", times=None, error=ZeroDivisionError("a bug"))
    rec = env.add()
    for _ in range(MAX_UNEXPECTED + 2):
        rec = env.drive(rec.id)
        if rec.state is not S.RETRY_WAIT:
            break
        env.retry_due(rec.id)
    assert rec.state is S.QUARANTINED
    assert rec.reason and "unexpected ZeroDivisionError: a bug" in rec.reason
    assert len(env.lake.asked("register")) == MAX_UNEXPECTED


def test_zero_byte_file_is_quarantined(env: Env) -> None:
    rec = env.drive(env.add("empty.fits", b"").id)
    assert rec.state is S.QUARANTINED and rec.resume_state is S.COMPLETE
    assert rec.reason and "zero-byte" in rec.reason
    assert Path(rec.fspath).exists()
    assert env.lake.calls == []


def test_zero_byte_file_allowed(make_env: Any) -> None:
    env = make_env(rule={"allow_empty": True})
    rec = env.drive(env.add("empty.fits", b"").id)
    assert rec.state is S.DELETED and rec.adler32 == "00000001"


def test_a_bad_name_is_quarantined(make_env: Any) -> None:
    env = make_env(rule={"name_template": "{filename}"})
    rec = env.drive(env.add("run42/bad?name.fits").id)
    assert rec.state is S.QUARANTINED and rec.reason and "name pattern" in rec.reason


# ---------------------------------------------------------------- deletion policies

def test_dry_run_never_deletes(make_env: Any, clock: Any) -> None:
    env = make_env(dry_run=True)
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    assert Path(rec.fspath).read_bytes() == DATA
    assert env.copy("a", rec).exists() and env.copy("b", rec).exists()
    assert rec.next_at == clock.now + env.s.confirm_interval_seconds
    for _ in range(3):
        clock.advance(10 * 86400)
        assert env.step(rec.id).state is S.CONFIRMED
    assert Path(rec.fspath).exists() and "deleted" not in env.events(rec.id)


def test_delete_never_keeps_the_file(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "never"})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED and rec.next_at == clock.now + 3600
    clock.advance(365 * 86400)
    assert env.step(rec.id).state is S.CONFIRMED
    assert Path(rec.fspath).read_bytes() == DATA


def test_keep_hours_waits_then_deletes(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 2})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    assert rec.confirmed_at is not None
    assert rec.next_at == rec.confirmed_at + 2 * 3600
    clock.advance(2 * 3600 - 1)
    assert env.step(rec.id).state is S.CONFIRMED
    assert Path(rec.fspath).exists()
    clock.advance(1)
    assert env.step(rec.id).state is S.DELETED
    assert not Path(rec.fspath).exists()


class Mono:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def keep_env(make_env: Any, clock: Any, mono: Mono) -> Env:
    env = make_env(rule={"delete": "keep", "keep_hours": 2})
    env.ctx = StepContext(env.s, env.ledger, env.lake, env.transports, pace=lambda n: None, clock=clock, rand=lambda: 0.5,
                          monotonic=mono)
    return env


def test_a_wall_clock_step_forward_does_not_shorten_keep(make_env: Any, clock: Any) -> None:
    mono = Mono()
    env = keep_env(make_env, clock, mono)
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    clock.advance(3 * 3600)                     # NTP steps forward past the keep period
    mono.now += 60
    rec = env.step(rec.id)                      # the wall time came due early: looked at, kept
    assert rec.state is S.CONFIRMED and Path(rec.fspath).exists()
    assert rec.next_at == clock.now + 2 * 3600 - 60
    mono.now += 2 * 3600 - 61
    assert env.step(rec.id).state is S.CONFIRMED
    mono.now += 1
    assert env.step(rec.id).state is S.DELETED


def test_a_wall_clock_step_back_does_not_stretch_keep(make_env: Any, clock: Any) -> None:
    mono = Mono()
    env = keep_env(make_env, clock, mono)
    rec = env.drive(env.add().id)
    clock.advance(-3 * 3600)
    mono.now += 2 * 3600
    assert env.step(rec.id).state is S.DELETED  # (made due by the runner, which saw the step)


def test_keep_after_a_restart_counts_the_time_down_by_the_wall_clock(make_env: Any, clock: Any) -> None:
    mono = Mono()
    env = keep_env(make_env, clock, mono)
    rec = env.drive(env.add().id)
    clock.advance(3600)                          # down for an hour
    mono.now = 7.0                               # after a reboot, the monotonic clock starts again
    env.ctx = StepContext(env.s, env.ledger, env.lake, env.transports, pace=lambda n: None, clock=clock, rand=lambda: 0.5,
                          monotonic=mono)
    rec = env.step(rec.id)
    assert rec.state is S.CONFIRMED and rec.next_at == clock.now + 3600
    clock.advance(-3 * 3600)                     # a step back after the restart: no longer kept for it
    mono.now += 3600
    assert env.step(rec.id).state is S.DELETED


def test_a_file_still_open_for_writing_is_not_deleted(env: Env, clock: Any) -> None:
    writers: dict[tuple[int, int], int] = {}
    env.ctx = StepContext(env.s, env.ledger, env.lake, env.transports, pace=lambda n: None, clock=clock, rand=lambda: 0.5,
                          open_writers=lambda dev, ino: writers.get((dev, ino), 0))
    rec = env.add()
    st = os.stat(rec.fspath)
    writers[(st.st_dev, st.st_ino)] = 1
    rec = env.drive(rec.id)
    assert rec.state is S.CONFIRMED and Path(rec.fspath).exists()
    assert rec.next_at > clock.now
    writers.clear()
    clock.advance(env.s.confirm_interval_seconds)
    assert env.step(rec.id).state is S.DELETED


def test_a_local_file_removed_by_someone_else_after_confirmation(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    os.unlink(rec.fspath)
    clock.advance(3600)
    rec = env.step(rec.id)
    assert rec.state is S.DELETED
    assert env.ledger.history(rec.id)[-1]["detail"]["outcome"] == "gone"


def test_one_copy_rule(make_env: Any) -> None:
    env = make_env(rule={"copies": 1, "destinations": ["b"]})
    rec = env.drive(env.add().id)
    assert rec.state is S.DELETED
    assert env.copy("b", rec).exists() and not env.copy("a", rec).exists()


# ---------------------------------------------------------------- a lake that replicates by rule

def test_replicas_do_not_confirm_while_the_rule_is_not_ok(env: Env, clock: Any) -> None:
    env.lake.rule_state = CopiesState.REPLICATING
    rec = env.drive(env.add().id)
    assert rec.state is S.TRANSFERRED and rec.lake_ref == "rule-1"
    assert rec.next_at == clock.now + env.s.confirm_interval_seconds
    assert Path(rec.fspath).exists()
    env.lake.rule_state = CopiesState.OK
    clock.advance(env.s.confirm_interval_seconds)
    rec = env.drive(rec.id)
    assert rec.state is S.DELETED
    assert env.ledger.history(rec.id)[-2]["detail"]["rule"] == {"id": "rule-1", "state": "OK"}


def test_confirming_under_an_ok_rule_is_one_clean_step(env: Env) -> None:
    """The confirmation's evidence names the rule ({"rule": {...}}): it must not collide with the
    log line's own `rule` field. It did: the transition was committed, then logging it raised
    TypeError, the step was reported as an unexpected error and the deletion waited a tick."""
    seen: list[State] = []
    env.ctx.hooks.transition = lambda rec: seen.append(rec.state)
    env.lake.rule_state = CopiesState.OK
    rec = env.drive(env.add().id, max_steps=4)
    assert rec.state is S.TRANSFERRED and rec.lake_ref == "rule-1"
    rec = env.step(rec.id)
    assert rec.state is S.DELETED                           # confirm deletes at once, as without a rule
    assert seen[-2:] == [S.CONFIRMED, S.DELETED]
    assert env.ledger.history(rec.id)[-2]["detail"]["rule"] == {"id": "rule-1", "state": "OK"}


def test_a_stuck_rule_is_flagged_once_and_nothing_is_deleted(env: Env, clock: Any) -> None:
    env.lake.rule_state = CopiesState.STUCK
    rec = env.drive(env.add().id)
    assert rec.state is S.TRANSFERRED
    assert rec.reason and "rule-1 is STUCK" in rec.reason
    clock.advance(env.s.confirm_interval_seconds)
    env.step(rec.id)
    assert env.events(rec.id).count("stuck") == 1
    assert Path(rec.fspath).exists()


def test_no_deletion_when_the_rule_falls_back_from_ok(make_env: Any, clock: Any) -> None:
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    env.lake.rule_state = CopiesState.OK
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    env.lake.rule_state = CopiesState.SUSPENDED
    clock.advance(3600)
    rec = env.step(rec.id)
    assert rec.state is S.CONFIRMED and Path(rec.fspath).exists()


def test_a_rule_that_disappeared_is_requested_again(env: Env) -> None:
    rec = env.drive(env.add().id, max_steps=4)
    assert rec.state is S.TRANSFERRED
    asked_before = len(env.lake.asked("request_copies"))
    env.lake.rule_state = CopiesState.OK      # the lake replicates now; its rule r-old is gone (expired)
    env.ledger.set_lake_ref(rec.id, "r-old")
    rec = env.step(rec.id)
    assert len(env.lake.asked("request_copies")) > asked_before and env.ledger.get(rec.id).lake_ref == "rule-1"
    assert "rule_recreated" in env.events(rec.id)


def _fits_bytes(flip: int | None = None) -> bytes:
    """A minimal FITS file (primary header, 2880 bytes of int8 data) with a correct DATASUM."""
    def card(k: str, v: str) -> bytes:
        return f"{k:<8}= {v:>20}".ljust(80).encode()
    data = bytes(range(256)) * 11 + bytes(64)            # 2880 bytes
    words = [int.from_bytes(data[i:i + 4], "big") for i in range(0, len(data), 4)]
    total = sum(words)
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    hdr = b"".join([card("SIMPLE", "T"), card("BITPIX", "8"), card("NAXIS", "1"), card("NAXIS1", "2880"),
                    card("OBJECT", "'Crab'"), card("EXPTIME", "30.0"), card("DATASUM", f"'{total}'"),
                    b"END".ljust(80)]).ljust(2880)
    out = bytearray(hdr + data)
    if flip is not None:
        out[flip] ^= 0x01
    return bytes(out)


def test_fits_headers_become_metadata(env: Env) -> None:
    rec = env.drive(env.add("run1/obs.fits", _fits_bytes()).id, max_steps=1)
    assert rec.state is S.HASHED
    assert rec.meta["object"] == "Crab" and rec.meta["exptime"] == 30.0


def test_a_fits_file_failing_its_own_datasum_is_quarantined_never_sent(env: Env) -> None:
    rec = env.drive(env.add("run1/bad.fits", _fits_bytes(flip=2880 + 100)).id)
    assert rec.state is S.QUARANTINED and "DATASUM" in (rec.reason or "")
    assert env.lake.asked("register") == [] and env.lake.asked("add_replica") == []
    # the copy written in the same read was removed: nothing of it is left in the lake
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))


def test_a_bad_copy_the_lake_made_is_reported_not_rewritten(env: Env, clock: Any) -> None:
    """Only copies at places the agent writes are rewritten; a lake-made bad copy is flagged."""
    storage = env.use(MockTransport())
    rec = env.drive(env.add().id, max_steps=4)
    assert rec.state is S.TRANSFERRED
    storage.lie(env.url("b", rec), RemoteStat(len(DATA), "deadbeef"))
    del env.lake.roots["b"]                       # from now on b's copy is the lake's own to make
    rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED                      # waits; nothing rewritten, nothing deleted
    assert rec.reason and "b:" in rec.reason and "adler32" in rec.reason
    assert "replica_lost" in env.events(rec.id)
    assert "failed_retryable" not in env.events(rec.id) and "rewrite_copies" not in env.events(rec.id)
    assert Path(rec.fspath).exists()


def test_a_file_that_may_not_be_deleted_is_quarantined_with_a_reason_an_operator_can_act_on(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_agent.steps.delete as delete_step

    def refuse(path: Any, expected: Any, recheck: Any = None) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(delete_step, "guarded_unlink", refuse)
    rec = env.drive(env.add().id)
    assert rec.state is S.QUARANTINED and rec.resume_state is S.CONFIRMED
    assert rec.reason == ("cannot delete run42/f1.fits: Permission denied (the agent needs write permission on "
                          f"its directory; the copies are confirmed: fix it, then `edge-agent retry {rec.id}`)")
    assert Path(rec.fspath).exists()
    monkeypatch.undo()
    assert env.drive(env.ledger.transition(rec.id, S.QUARANTINED, E.OPERATOR_RETRY).id).state is S.DELETED


def test_a_ledger_that_cannot_record_a_step_is_not_asked_to_record_the_failure(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.errors import LedgerUnwritable
    rec = env.add()

    def full(*a: Any, **k: Any) -> Any:
        raise LedgerUnwritable("the ledger cannot be written: database or disk is full")

    monkeypatch.setattr(env.ledger, "transition", full)
    with pytest.raises(LedgerUnwritable):
        steps.run([rec], env.ctx)        # the runner pauses; not an "unexpected error" with retries
    monkeypatch.undo()
    assert env.ledger.get(rec.id).state is S.COMPLETE and env.ledger.get(rec.id).attempts == 0
    assert env.drive(rec.id).state is S.DELETED       # the repeated step goes through afterwards


# ---------------------------------------------------------------- one read per upload

def test_the_first_copy_is_written_in_the_hashing_pass(env: Env) -> None:
    rec = env.add()
    storage = env.use(MockTransport())
    rec = env.step(rec.id)
    assert rec.state is S.HASHED and rec.adler32 == adler(DATA)
    # before the DID exists, copy a is written: read once, hashed in that read
    assert storage.objects == {env.url("a", rec): DATA}
    assert sum(env.hashed) == len(DATA) and env.sent == {"a": len(DATA)}
    assert [(r["location"], r["state"]) for r in env.ledger.replicas(rec.id)] == [("a", "sent")]
    assert env.lake.calls == []
    end = env.drive(rec.id)
    assert end.state is S.DELETED
    # b is written with the recorded hashes checked; a and b are recorded in the lake only once both
    # are written (the record step, after `copied`)
    assert env.lake.calls[:3] == [Call("register", DID), Call("add_replica", DID, "a"), Call("add_replica", DID, "b")]
    events = env.events(rec.id)
    assert events.index("copied") < events.index("transferred") and events.count("copy_written") == 2
    assert [(url, e.known) for url, e in storage.puts] == [(env.url("a", rec), False), (env.url("b", rec), True)]
    # b was found empty by the transfer step, right before its upload: the transport need not look again
    assert [(e.may_replace, e.found_empty) for _, e in storage.puts] == [(False, False), (True, True)]
    assert sum(env.hashed) == len(DATA) and env.sent == {"a": len(DATA), "b": len(DATA)}


def test_without_a_free_name_the_file_is_hashed_alone_first(env: Env) -> None:
    env.lake.free_names = False
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED and not env.copy("a", rec).exists()
    assert env.ledger.replicas(rec.id) == []
    assert env.drive(rec.id).state is S.DELETED
    assert sum(env.hashed) == len(DATA) and env.sent == {"a": len(DATA), "b": len(DATA)}


def test_a_name_held_by_another_version_is_decided_by_content_after_hashing(env: Env) -> None:
    storage = env.use(MockTransport())
    first = env.drive(env.add("f1.fits", b"first night").id)
    storage.puts.clear()
    second = env.step(env.add("f1.fits", b"second, different night").id)
    # no copy may be written under f1.fits before the content is known: it is the first version's
    assert storage.puts == [] and second.name == "f1.fits.v2"
    assert storage.objects[env.url("a", first)] == b"first night"


def test_a_lake_that_holds_the_name_already_gets_no_first_copy(env: Env) -> None:
    rec = env.add()
    env.lake.dids[DID] = dataclasses.replace(
        LakeFile.unhashed("r", "test", "run42/f1.fits", len(DATA), 2, ("a", "b"), rec.fspath),
        adler32=adler(DATA), blake3="x")
    storage = env.use(MockTransport())
    rec = env.step(rec.id)
    assert rec.state is S.HASHED and storage.puts == []


def test_a_file_changing_during_the_first_copy_leaves_no_copy(env: Env, monkeypatch: Any) -> None:
    rec = env.add()
    original = PosixTransport.put

    def put_then_touch(self: Any, source: Source, url: str, expected: Any, pace: Any, also: Any = ()) -> Any:
        got = original(self, source, url, expected, pace, also)
        with open(str(source), "ab") as fh:      # the DAQ appends right after the copy was read
            fh.write(b"late frame")
        return got

    monkeypatch.setattr(PosixTransport, "put", put_then_touch)
    rec = env.step(rec.id)
    assert rec.state is S.DISCOVERED          # back to waiting for completion, nothing recorded
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))
    assert env.ledger.replicas(rec.id) == []


def test_bytes_at_a_reserved_url_are_never_taken_for_the_files_copy_nor_replaced(env: Env) -> None:
    """A name reserved before a crash (or by a version of another agent sharing the lake): what lies
    at its URL may be a partial copy of this version or another writer's copy; nothing proves which,
    so it is never overwritten and the name is decided by content (review 2, finding 1)."""
    rec = env.add()
    stale = env.roots["a"] / "test" / "run42" / "f1.fits"
    assert env.ledger.reserve_name("test", "run42/f1.fits", rec.id, str(stale))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half of it, or someone else's")
    end = env.drive(rec.id)
    assert stale.read_bytes() == b"half of it, or someone else's"
    assert end.state is S.DELETED and end.name == "run42/f1.fits.v2" and env.copy("a", end).read_bytes() == DATA
    assert env.ledger.name_hold("test", "run42/f1.fits") is None      # the reservation not taken is freed


def test_a_reserved_url_holding_the_same_bytes_keeps_the_name(env: Env) -> None:
    rec = env.add()
    there = env.roots["a"] / "test" / "run42" / "f1.fits"
    assert env.ledger.reserve_name("test", "run42/f1.fits", rec.id, str(there))
    there.parent.mkdir(parents=True)
    there.write_bytes(DATA)                 # a first copy whose 'sent' record a crash prevented
    end = env.drive(rec.id)
    assert end.state is S.DELETED and end.name == "run42/f1.fits" and there.read_bytes() == DATA


def test_bytes_at_a_destination_that_no_version_wrote_are_never_replaced(env: Env) -> None:
    """Item 5: the catalogue lost (or never told): an older night's only copy lies under the name."""
    older = env.roots["b"] / "test" / "run42" / "f1.fits"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"an older night's only copy")
    end = env.drive(env.add().id)
    assert end.state is S.DELETED and end.name == "run42/f1.fits.v2"
    assert older.read_bytes() == b"an older night's only copy"
    assert env.copy("a", end).read_bytes() == DATA and env.copy("b", end).read_bytes() == DATA


def test_bytes_appearing_at_a_destination_before_its_copy_are_never_replaced(env: Env) -> None:
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED and rec.name == "run42/f1.fits"
    intruder = env.copy("b", rec)
    intruder.parent.mkdir(parents=True)
    intruder.write_bytes(b"written by someone else")
    end = env.drive(rec.id)
    assert end.state is S.QUARANTINED and "never replaced" in (end.reason or "")
    assert intruder.read_bytes() == b"written by someone else" and Path(end.fspath).exists()


def test_a_name_is_reserved_durably_before_its_first_copy(env: Env) -> None:
    a, b = env.add("run1/img.dat", b"A" * 3000), env.add("run2/img.dat", b"B" * 3000)
    assert env.ledger.reserve_name("test", "img.dat", a.id)
    assert env.ledger.reserve_name("test", "img.dat", a.id)          # repeated after a crash: still a's
    assert not env.ledger.reserve_name("test", "img.dat", b.id)
    # reopened (a restart): the reservation is still there
    env.ledger.close()
    env.ledger = open_ledger(env.s.ledger_path, clock=env.clock)
    hold = env.ledger.name_hold("test", "img.dat")
    assert hold is not None and (hold.owner, hold.state, hold.blake3) == (a.id, "writing", None)


def test_a_superseded_version_removes_its_unregistered_first_copy(env: Env) -> None:
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED and env.copy("a", rec).exists()
    # what the runner does when the watcher sees the file rewritten before its registration
    env.ledger.transition(rec.id, S.HASHED, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    steps.discard_unregistered(rec, env.ctx)
    assert not env.copy("a", rec).exists()
    assert [(r["location"], r["state"]) for r in env.ledger.replicas(rec.id)] == [("a", "removed")]


# ---------------------------------------------------------------- custody: one name, one content

def test_two_files_rendering_one_name_never_share_a_url(make_env: Any) -> None:
    """Item 1: `{filename}` gives run1/img.dat and run2/img.dat one name; while the first copy of one
    is being written (hash_workers >= 2), the other is hashed. Each keeps its own bytes in the lake."""
    env = make_env(rule={"name_template": "{filename}"})
    a = env.add("run1/img.dat", b"A" * 3_000_000)
    b = env.add("run2/img.dat", b"B" * 2_000_000)
    inside: list[FileRecord] = []

    def pace(n: int) -> None:              # a's first copy is in flight: b's hash step runs now
        if not inside:
            inside.append(env.step(b.id))
    env.ctx.pace = pace
    a_hashed = env.step(a.id)
    env.ctx.pace = lambda n: None
    # b waits: a's bytes are not known yet, and b's may be the same
    assert a_hashed.name == "img.dat" and inside and inside[0].state is S.RETRY_WAIT
    assert not any("img.dat" in p.name and p.name != "img.dat" for p in env.roots["a"].rglob("*"))
    env.retry_due(b.id)
    assert env.step(b.id).name == "img.dat.v2"
    ends = [env.drive(a.id), env.drive(b.id)]
    assert [e.state for e in ends] == [S.DELETED, S.DELETED]
    for end, data in zip(ends, (b"A" * 3_000_000, b"B" * 2_000_000)):
        for loc in ("a", "b"):
            assert env.copy(loc, end).read_bytes() == data, (end.name, loc)


def test_a_copy_another_version_counts_is_never_removed(env: Env) -> None:
    """Item 2: a's first copy is written; b (the same bytes, another path) shares the name and counts
    that copy; a then changes and is superseded: the copy b relies on stays, and b goes on with it."""
    env.s.rules["r"].name_template = "{filename}"
    a = env.step(env.add("run1/img.dat").id)
    assert a.state is S.HASHED and [r["state"] for r in env.ledger.replicas(a.id)] == ["sent"]
    b = env.add("run2/img.dat")
    for _ in range(3):
        b = env.step(b.id)
    # a still writes the copies under the name: b waits for them, writing nothing itself
    assert b.name == a.name and b.state is S.RETRY_WAIT and "being written by file" in (b.reason or "")
    env.ledger.transition(a.id, S.HASHED, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    steps.discard_unregistered(a, env.ctx)
    assert env.copy("a", b).read_bytes() == DATA
    hold = env.ledger.name_hold("test", "img.dat")
    assert hold is not None and hold.owner == b.id
    env.retry_due(b.id)
    b = env.drive(b.id)
    assert b.state is S.DELETED
    for loc in ("a", "b"):
        assert env.copy(loc, b).read_bytes() == DATA


def test_versions_sharing_a_name_never_write_one_url_at_once(env: Env) -> None:
    """Two versions with the same bytes share a name: only one writes its copies; the other counts
    them once written (a failed upload of one can then never remove the other's copy)."""
    env.s.rules["r"].name_template = "{filename}"
    a = env.step(env.add("run1/img.dat").id)
    b = env.step(env.add("run2/img.dat").id)
    b = env.step(b.id)
    assert b.state is S.REGISTERED
    b = env.step(b.id)
    assert b.state is S.RETRY_WAIT and env.ledger.replicas(b.id) == []
    assert not env.copy("b", a).exists()
    a = env.drive(a.id)
    assert a.state is S.DELETED
    env.retry_due(b.id)
    b = env.drive(b.id)
    assert b.state is S.DELETED and [(r["location"], r["state"]) for r in env.ledger.replicas(b.id)] == [
        ("a", "written"), ("b", "written")]


def test_a_first_read_that_fails_frees_its_name(env: Env, monkeypatch: Any) -> None:
    rec = env.add()
    original = PosixTransport.put

    def put_then_vanish(self: Any, source: str, url: str, expected: Any, pace: Any, also: Any = ()) -> Any:
        got = original(self, source, url, expected, pace, also)
        os.unlink(str(source))             # renamed away by the DAQ right after the copy was read
        return got
    monkeypatch.setattr(PosixTransport, "put", put_then_vanish)
    end = env.step(rec.id)
    assert end.state is S.DISCOVERED
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))
    assert env.ledger.name_hold("test", "run42/f1.fits") is None


def test_a_resumed_reservation_never_overwrites_a_destination_it_did_not_reserve(env: Env) -> None:
    """Review finding: the name was reserved for a first copy at another URL (the configuration changed
    since, e.g. an archive with a lost catalogue became the first destination): what lies at the new
    first URL is not this version's and is never replaced."""
    rec = env.add()
    assert env.ledger.reserve_name("test", "run42/f1.fits", rec.id, "/elsewhere/test/run42/f1.fits")
    older = env.roots["a"] / "test" / "run42" / "f1.fits"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"last year's only copy")
    end = env.drive(rec.id)
    assert older.read_bytes() == b"last year's only copy"
    assert end.state is S.DELETED and end.name != "run42/f1.fits"


def test_what_a_crash_left_of_an_ended_version_is_cleaned_up_at_start(env: Env) -> None:
    """Review finding: superseded before its first copy was removed (a crash), or before its reservation
    was bound: the next start removes the unregistered copy and frees the name."""
    import types

    from edge_agent.runner import Runner
    a = env.step(env.add("run1/a.dat").id)                     # first copy written ('sent')
    env.ledger.transition(a.id, S.HASHED, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    b = env.add("run2/b.dat")                                   # reserved, first copy written, not bound
    url = env.roots["a"] / "test" / "run2" / "b.dat"
    assert env.ledger.reserve_name("test", "run2/b.dat", b.id, str(url))
    url.parent.mkdir(parents=True)
    url.write_bytes(b"partial first copy")
    env.ledger.transition(b.id, S.COMPLETE, E.SUPERSEDED, {"reason": "vanished"}, reason="vanished")
    assert env.ledger.ended_holders() == [a.id, b.id]
    Runner.finish_cleanups(types.SimpleNamespace(ledger=env.ledger, context=env.ctx))  # type: ignore[arg-type]
    # a's copy is proven its own ('sent'): removed; what lies at b's reserved URL is not proven to be
    # b's (another writer's copy looks the same): kept, as dark data at worst (review 2, finding 2)
    assert not env.copy("a", a).exists() and url.read_bytes() == b"partial first copy"
    assert env.ledger.name_hold("test", a.name or "") is None and env.ledger.name_hold("test", "run2/b.dat") is None
    assert env.ledger.ended_holders() == []


# ---------------------------------------------------------------- a deletion cut short

class Killed(BaseException):
    """kill -9: nothing after it runs."""


def crash_between_the_rename_and_the_unlink(env: Env, monkeypatch: pytest.MonkeyPatch, fid: int) -> FileRecord:
    real = os.unlink

    def dying(p: Any, *a: Any, **kw: Any) -> None:
        if b"edge-agent-deleting" in os.fsencode(p):
            raise Killed()
        real(p, *a, **kw)
    monkeypatch.setattr(os, "unlink", dying)
    with pytest.raises(Killed):
        env.drive(fid)
    monkeypatch.setattr(os, "unlink", real)
    rec = env.ledger.get(fid)
    assert rec.state is S.CONFIRMED and not os.path.lexists(rec.fspath)
    return rec


def agent_names(env: Env) -> list[str]:
    return [n for n in os.listdir(env.daq) if is_agent_temp(n)]


def test_a_deletion_cut_short_and_a_new_file_under_the_path_never_block_each_other(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old version's leftover once made every later version of the path 'changed': superseded,
    sent again and rediscovered forever. Now the ended version finishes its own deletion, and the
    new version is deleted on its own evidence."""
    v1 = crash_between_the_rename_and_the_unlink(env, monkeypatch, env.add("f.dat").id)
    Path(v1.fspath).write_bytes(b"second content " * 100)       # the DAQ, while the agent was down
    # the restart's rescan finds another inode at the live row's path (what runner.discovery.evaluate does)
    env.ledger.transition(v1.id, v1.state, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    steps.discard_unregistered(v1, env.ctx)
    assert agent_names(env) == []                 # v1's confirmed bytes: deleted, not kept forever
    st = os.stat(v1.fspath)
    v2 = env.ledger.discover("r", os.fsencode(v1.fspath), "f.dat", st.st_dev, st.st_ino, st.st_size,
                             st.st_mtime_ns, 0)
    end = env.drive(env.ledger.transition(v2.id, S.DISCOVERED, E.COMPLETED).id)
    assert (end.state, end.version) == (S.DELETED, 2)
    assert os.listdir(env.daq) == []


def test_a_deletion_cut_short_is_finished_even_if_a_new_file_took_the_path(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = crash_between_the_rename_and_the_unlink(env, monkeypatch, env.add("f.dat").id)
    Path(v1.fspath).write_bytes(b"second content " * 100)
    end = env.step(v1.id)
    assert end.state is S.DELETED and env.ledger.history(v1.id)[-1]["detail"]["outcome"] == "deleted"
    assert agent_names(env) == [] and Path(v1.fspath).read_bytes() == b"second content " * 100


@pytest.mark.parametrize(("failure", "end"), [
    ("changed", S.SUPERSEDED),
    (SymlinkInPath("a directory on the way is now a symlink"), S.SUPERSEDED),
    (PermissionError(13, "Permission denied"), S.QUARANTINED),
])
def test_a_deletion_failing_right_after_confirmation_is_recorded_by_that_step(
        env: Env, monkeypatch: pytest.MonkeyPatch, failure: Any, end: State) -> None:
    """confirm records the confirmation, then deletes at once: a failure of the deletion is recorded
    on the row as it is now (confirmed), not lost on the one the step started from."""
    import edge_agent.steps.delete as delete_step

    def unlink(path: Any, expected: Any, recheck: Any = None) -> str:
        if isinstance(failure, BaseException):
            raise failure
        return str(failure)
    monkeypatch.setattr(delete_step, "guarded_unlink", unlink)
    rec = env.add()
    for _ in range(4):
        rec = env.step(rec.id)
    assert rec.state is S.TRANSFERRED
    rec = env.step(rec.id)
    assert rec.state is end
    if end is S.QUARANTINED:
        assert rec.resume_state is S.CONFIRMED and "Permission denied" in (rec.reason or "")
    assert Path(rec.fspath).exists()


def test_a_leftover_that_is_not_the_confirmed_version_comes_back_under_a_name_the_watcher_sees(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.localfs import deleting_name
    v1 = crash_between_the_rename_and_the_unlink(env, monkeypatch, env.add("f.dat").id)
    assert v1.inode is not None
    with open(deleting_name(os.fsencode(v1.fspath), v1.inode), "ab") as fh:
        fh.write(b"written through a descriptor still open")     # never sent
    Path(v1.fspath).write_bytes(b"second content " * 100)
    assert env.step(v1.id).state is S.SUPERSEDED
    assert agent_names(env) == []
    assert (env.daq / f"f.restored-{v1.inode}.dat").read_bytes() == DATA + b"written through a descriptor still open"
    assert Path(v1.fspath).read_bytes() == b"second content " * 100


def test_a_dry_run_puts_an_ended_versions_leftover_back(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = crash_between_the_rename_and_the_unlink(env, monkeypatch, env.add("f.dat").id)
    env.ctx.settings = env.s.model_copy(update={"dry_run": True})     # restarted with dry_run = true
    Path(v1.fspath).write_bytes(b"second content " * 100)
    env.ledger.transition(v1.id, v1.state, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    steps.discard_unregistered(v1, env.ctx)
    assert agent_names(env) == []
    assert (env.daq / f"f.restored-{v1.inode}.dat").read_bytes() == DATA


def test_a_copy_registered_for_another_version_is_never_removed(env: Env) -> None:
    """Review 2, finding 3: c (same bytes as a) counted a's first copy, registered it and was
    confirmed, then was superseded (rewritten during its keep period); a then ends: the copy stays,
    since c's bytes now live only there."""
    env.s.rules["r"].name_template = "{filename}"
    env.s.rules["r"].delete = DeletePolicy.NEVER
    a = env.step(env.add("run1/img.dat").id)
    # a's registration fails for good: it waits for a person (and no longer writes the name's copies)
    a = env.ledger.transition(a.id, S.HASHED, E.FAILED_PERMANENT, {"reason": "refused"}, reason="refused")
    c = env.drive(env.add("run2/img.dat").id)
    assert c.state is S.CONFIRMED and c.name == "img.dat"
    env.ledger.transition(c.id, S.CONFIRMED, E.SUPERSEDED, {"reason": "rewritten"}, reason="rewritten")
    a = env.ledger.transition(a.id, S.QUARANTINED, E.SUPERSEDED, {"reason": "vanished"}, reason="vanished")
    steps.discard_unregistered(env.ledger.get(a.id), env.ctx)
    assert env.copy("a", c).read_bytes() == DATA and env.copy("b", c).read_bytes() == DATA


def register_env(make_env: Any) -> Env:
    env = make_env(rule={"inject": "register", "buffer_rse": "BUF", "buffer_url": "root://daq//buf/",
                         "rse_expression": "lake=true", "destinations": [], "copies": 2},
                   lake=RUCIO, destinations={})
    # the lake replicates from the buffer: two copies it records, and their storage holds the bytes
    env.lake.writes_copies, env.lake.listed = False, True
    storage = MockTransport("root")
    env.transports.mount("root://", storage)
    for loc in ("L1", "L2"):
        storage_url = f"root://{loc}//lake/{DID}"
        env.lake.list_replica(DID, loc, storage_url)
        storage.objects[storage_url] = DATA
    return env


def test_register_in_place_releases_after_the_daqs_name_is_gone(make_env: Any) -> None:
    env = register_env(make_env)
    rec = env.step(env.add().id)
    link = env.daq / ".edge-agent-inplace" / f"{rec.id}.edge-agent-inplace"
    assert os.path.samefile(link, rec.fspath)          # the agent's own name, made before hashing
    assert env.ctx.lake_file(rec).buffer_path == str(link)
    order: list[str] = []
    env.lake.release = lambda f: order.append(f"DAQ name there: {os.path.exists(rec.fspath)}")  # type: ignore[method-assign]
    end = env.drive(rec.id)
    assert end.state is S.DELETED and order == ["DAQ name there: False"]
    assert not link.exists() and not Path(rec.fspath).exists()


def test_a_version_registered_at_the_daqs_own_path_is_not_released_with_a_new_file_there(make_env: Any) -> None:
    """Review 2, finding 4: a row hashed by an older agent (no in-place name) is registered at the
    DAQ's path: with a new file there, releasing it would let the reaper remove the new file."""
    env = register_env(make_env)
    env.s.rules["r"].delete = DeletePolicy.NEVER
    rec = env.step(env.add().id)
    # as an older agent left it: no in-place name, no ctime recorded
    (env.daq / ".edge-agent-inplace" / f"{rec.id}.edge-agent-inplace").unlink()
    env.ledger._db.execute("UPDATE files SET ctime_ns = NULL WHERE id = ?", (rec.id,))
    rec = env.drive(rec.id)
    assert rec.state is S.CONFIRMED
    Path(rec.fspath).unlink()
    Path(rec.fspath).write_bytes(b"the next file")     # the DAQ publishes the next file under the path
    # what the runner does when the rescan finds the new file: the version ends, its record as it was
    env.ledger.transition(rec.id, S.CONFIRMED, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    steps.discard_unregistered(rec, env.ctx)
    assert env.lake.released == [] and Path(rec.fspath).read_bytes() == b"the next file"


def test_a_bad_copy_is_rewritten_whatever_the_catalogue_calls_its_url(make_env: Any, clock: Any) -> None:
    """Found by the real-lake test: Rucio lists a replica by a PFN spelled otherwise than the URL the
    agent writes (another scheme, '//'): the copy is still the agent's own to write again."""
    env = make_env(rule={"delete": "keep", "keep_hours": 1})
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED
    # the catalogue lists b's copy under another spelling of the same place, whose storage answers
    elsewhere = "root://elsewhere//" + env.url("b", rec).lstrip("/")
    env.lake.list_replica(DID, "b", elsewhere)
    storage = MockTransport("root")
    storage.objects[elsewhere] = b"rotted" + DATA[6:]
    env.transports.mount("root://elsewhere/", storage)
    env.copy("b", rec).write_bytes(b"rotted" + DATA[6:])
    clock.advance(3600)
    rec = env.step(rec.id)
    assert rec.state is S.RETRY_WAIT
    env.retry_due(rec.id)
    rec = env.drive(rec.id)
    assert rec.state is S.CONFIRMED and env.copy("b", rec).read_bytes() == DATA


def test_a_name_taken_between_the_decision_and_the_commit_is_decided_again_without_a_second_read(
        env: Env, monkeypatch: Any) -> None:
    """Files hashed side by side whose templates render one name: one may bind the versioned name the
    other just chose; the other decides again with its digests in hand (seen in the lake storm)."""
    env.s.rules["r"].name_template = "{filename}"
    env.drive(env.add("run1/img.dat", b"first").id)                    # holds img.dat
    rival = env.ledger.transition(env.add("run3/img.dat", b"rival").id, S.COMPLETE, E.FAILED_RETRYABLE)
    import edge_agent.steps.naming as naming
    real = naming.decide_name
    calls: list[str] = []

    def racing(rec: FileRecord, ctx: Any, scope: str, base: str, d: Any) -> str:
        name = real(rec, ctx, scope, base, d)
        if not calls:                                                  # the rival commits first
            env.ledger._db.execute("INSERT INTO names (scope, name, owner, blake3, state, at) "
                                   "VALUES (?, ?, ?, 'rival', 'bound', 0)", (scope, name, rival.id))
        calls.append(name)
        return name
    monkeypatch.setattr(naming, "decide_name", racing)
    before = sum(env.hashed)
    rec = env.step(env.add("run2/img.dat", b"second").id)
    assert rec.state is S.HASHED and calls == ["img.dat.v2", "img.dat.v3"] and rec.name == "img.dat.v3"
    assert sum(env.hashed) - before == len(b"second")                 # one read


def test_bytes_at_a_destination_that_cannot_be_proven_these_get_another_name(env: Env) -> None:
    """Review 3: the same size and adler32 prove nothing about bytes nobody in the ledger wrote."""
    # a storage that answers size and adler32 but no strong digest (XRootD, WebDAV)
    storage = env.use(MockTransport(recognises="adler32"))
    env.lake.free_names = False               # hashed alone: the name is decided by content
    there = str(env.roots["a"] / "test" / "run42" / "f1.fits")
    storage.objects[there] = DATA             # the very bytes, but nothing says who wrote them
    end = env.drive(env.add().id)
    assert end.state is S.DELETED and end.name == "run42/f1.fits.v2" and storage.objects[there] == DATA


@pytest.mark.parametrize("recorded", [False, True])
def test_a_partial_first_copy_left_by_a_cut_short_upload_is_replaced_unless_the_lake_records_it(
        env: Env, recorded: bool) -> None:
    """A kill -9 in the middle of the first copy's PUT leaves a partial object at the reserved URL: the
    resumed version replaces it (no dark data, the name kept); an object the lake's catalogue records
    is someone's copy and is never replaced."""
    # a storage where an upload cut short leaves a partial object under the final name (WebDAV, XRootD)
    storage = env.use(MockTransport(leaves_partials=True))
    rec = env.add()
    partial = str(env.roots["a"] / "test" / "run42" / "f1.fits")
    assert env.ledger.reserve_name("test", "run42/f1.fits", rec.id, partial)
    storage.objects[partial] = DATA[:1000]
    if recorded:                              # someone's copy, recorded in the catalogue
        env.lake.list_replica(DID, "a", partial)
    end = env.drive(rec.id)
    assert end.state is S.DELETED
    if recorded:
        assert end.name == "run42/f1.fits.v2" and storage.objects[partial] == DATA[:1000]
    else:
        assert end.name == "run42/f1.fits" and storage.objects[partial] == DATA


# ---------------------------------------------------------------- batches
def to_state(env: Env, n: int, state: State) -> list[FileRecord]:
    """n files of one dataset moved file by file up to `state`."""
    recs = []
    for i in range(n):
        rec = env.add(f"run42/b{i}.fits", DATA + bytes([i]))
        while rec.state is not state:
            rec = env.step(rec.id)
        recs.append(rec)
    return recs


def spy(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[Any]:
    seen: list[Any] = []
    real = getattr(obj, name)

    def call(*a: Any, **kw: Any) -> Any:
        seen.append(a)
        return real(*a, **kw)
    monkeypatch.setattr(obj, name, call)
    return seen


def test_a_batch_is_registered_by_one_catalogue_call_and_one_commit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = to_state(env, 4, S.HASHED)
    asked = spy(monkeypatch, env.lake, "register_many")
    commits = spy(monkeypatch, env.ledger, "transition_group")
    steps.run(recs, env.ctx)
    assert [env.ledger.get(r.id).state for r in recs] == [S.REGISTERED] * 4
    assert len(asked) == 1 and len(asked[0][0]) == 4
    assert len(commits) == 1 and len(commits[0][0]) == 4


def test_a_file_the_catalogue_refuses_fails_alone_and_the_batch_goes_on(env: Env,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recs = to_state(env, 3, S.HASHED)
    real = env.lake.register_many

    def refuse_second(files: Any) -> list[Exception | None]:
        out = real([f for i, f in enumerate(files) if i != 1])
        return [out[0], PermanentError("the lake holds this name with other content"), out[1]]
    monkeypatch.setattr(env.lake, "register_many", refuse_second)
    steps.run(recs, env.ctx)
    states = [env.ledger.get(r.id) for r in recs]
    assert [r.state for r in states] == [S.REGISTERED, S.QUARANTINED, S.REGISTERED]
    assert states[1].reason == "the lake holds this name with other content"


def test_a_whole_catalogue_call_that_fails_sends_every_file_of_the_batch_to_wait(env: Env) -> None:
    recs = to_state(env, 3, S.HASHED)
    env.lake.fail("register", times=None)
    steps.run(recs, env.ctx)
    assert [env.ledger.get(r.id).state for r in recs] == [S.RETRY_WAIT] * 3


def test_a_batch_is_confirmed_on_one_question_to_the_catalogue_and_deleted(env: Env,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recs = to_state(env, 3, S.TRANSFERRED)
    asked = spy(monkeypatch, env.lake, "recorded_many")
    commits = spy(monkeypatch, env.ledger, "transition_group")
    steps.run(recs, env.ctx)
    assert [env.ledger.get(r.id).state for r in recs] == [S.DELETED] * 3
    assert len(asked) == 1 and len(asked[0][0]) == 3
    assert len(commits) == 1 and [m.event for m in commits[0][0]] == [E.CONFIRMED] * 3
    for r in recs:
        assert not Path(r.fspath).exists()


def test_a_batch_holds_one_state(env: Env) -> None:
    a, b = to_state(env, 1, S.HASHED)[0], env.add("run42/other.fits")
    with pytest.raises(ValueError):
        steps.run([a, b], env.ctx)


def test_a_batch_s_copies_are_recorded_and_requested_by_one_call_each_and_one_commit(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = to_state(env, 3, S.COPIED)
    assert all({r["state"] for r in env.ledger.replicas(rec.id)} == {"sent"} for rec in recs)
    added = spy(monkeypatch, env.lake, "add_replicas_many")
    asked = spy(monkeypatch, env.lake, "request_copies_many")
    commits = spy(monkeypatch, env.ledger, "transition_group")
    steps.run(recs, env.ctx)
    assert [env.ledger.get(r.id).state for r in recs] == [S.TRANSFERRED] * 3
    assert len(added) == 1 and len(added[0][0]) == 6          # two copies each
    assert len(asked) == 1 and len(asked[0][0]) == 3
    assert len(commits) == 1
    assert all({r["state"] for r in env.ledger.replicas(rec.id)} == {"written"} for rec in recs)


def test_a_copy_the_catalogue_will_not_record_holds_back_its_file_alone(env: Env,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recs = to_state(env, 3, S.COPIED)
    real = env.lake.add_replicas_many

    def refuse_middle(copies: Any) -> list[Exception | None]:
        out = real(copies)
        return [PermanentError("refused") if f.name == recs[1].name else o for (f, _, _), o in zip(copies, out)]
    monkeypatch.setattr(env.lake, "add_replicas_many", refuse_middle)
    steps.run(recs, env.ctx)
    now = [env.ledger.get(r.id) for r in recs]
    assert [r.state for r in now] == [S.TRANSFERRED, S.QUARANTINED, S.TRANSFERRED]
    assert {r["state"] for r in env.ledger.replicas(recs[1].id)} == {"sent"}   # not counted as recorded


def test_a_file_the_catalogue_cannot_be_asked_about_fails_alone_at_confirmation(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = to_state(env, 3, S.TRANSFERRED)
    real = env.lake.recorded

    def refuse_one(f: Any) -> Any:
        if f.name == recs[1].name:
            raise PermanentError("the catalogue refuses to list this one")
        return real(f)
    monkeypatch.setattr(env.lake, "recorded", refuse_one)
    steps.run(recs, env.ctx)
    assert [env.ledger.get(r.id).state for r in recs] == [S.DELETED, S.QUARANTINED, S.DELETED]


def test_a_hashing_job_of_several_files_tells_the_catalogue_their_names_ahead(env: Env,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(env.lake, "foresee", lambda files: seen.append([f.did for f in files]))
    recs = [env.add(f"run42/f{i}.fits") for i in range(3)]
    steps.run(recs, env.ctx)
    assert seen == [[f"test:run42/f{i}.fits" for i in range(3)]]
    assert [env.ledger.get(r.id).state for r in recs] == [S.HASHED] * 3
    assert [env.ledger.get(r.id).did for r in recs] == seen[0]     # the names foreseen are the names given


def test_a_copy_whose_move_finds_the_file_moved_is_still_remembered_for_the_clean_up(env: Env) -> None:
    """The last copy commits with the move; when the move finds the version ended meanwhile (the
    file changed or went after the write), the copy is recorded all the same, 'sent', as before:
    the clean-up of an ended version removes what is recorded so."""
    from edge_agent.ledger import StaleTransition, WrittenCopy
    from edge_agent.core.lifecycle import CopyState
    rec = env.drive(env.add().id, max_steps=2)
    assert rec.state is S.REGISTERED
    env.ledger.transition(rec.id, S.REGISTERED, E.SUPERSEDED)     # ended by discovery meanwhile
    copy = WrittenCopy("b", "/lake-b/x", 3, "00000001", CopyState.SENT)
    with pytest.raises(StaleTransition):
        env.ctx.move(rec, E.COPIED, copies=[copy])
    assert [(r["location"], r["state"]) for r in env.ledger.replicas(rec.id)] == [("a", "sent"), ("b", "sent")]


# ---------------------------------------------------------------- review of 2026-12-07 (R1, R2)

class _Crash(BaseException):
    """kill -9 (never caught by the steps)."""


def test_a_version_sharing_a_name_recognises_the_copy_its_writer_left_when_killed_before_recording_it(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """R1: the writer of a name (same bytes) dies between its last upload and the commit that records
    it: its row stays 'writing'. The sharer dispatched first after the restart found a copy it
    could not attribute and was quarantined as 'other bytes'."""
    env.s.rules["r"].name_template = "{filename}"
    env.use(MockTransport("mock", leaves_partials=True, recognises="adler32"))
    a = env.step(env.step(env.add("run1/img.dat").id).id)
    assert a.state is S.REGISTERED
    real = env.ledger.transition

    def dying(fid: int, expect: Any, event: Any, *args: Any, **kw: Any) -> Any:
        if fid == a.id and event is E.COPIED:
            raise _Crash()
        return real(fid, expect, event, *args, **kw)
    monkeypatch.setattr(env.ledger, "transition", dying)
    with pytest.raises(_Crash):
        env.step(a.id)
    monkeypatch.setattr(env.ledger, "transition", real)
    assert "writing" in [r["state"] for r in env.ledger.replicas(a.id)]
    b = env.step(env.step(env.add("run2/img.dat").id).id)
    assert b.state is S.REGISTERED and b.name == a.name
    b = env.step(b.id)
    assert b.state is not S.QUARANTINED, b.reason
    assert env.drive(b.id).state is S.DELETED and env.drive(a.id).state is S.DELETED


def test_on_a_storage_trusted_with_sizes_alone_a_version_sharing_a_name_recognises_its_copies(env: Env) -> None:
    """R2: with verify_upload = "size" (the storage answers no adler32) a copy written by a version
    with the same bytes could never be recognised: the second version was quarantined."""
    env.s.rules["r"].name_template = "{filename}"
    mock = env.use(MockTransport("mock", leaves_partials=True, recognises="adler32", verify_upload="size"))
    a = env.drive(env.add("run1/img.dat").id)
    assert a.state is S.DELETED, a.reason
    for loc in ("a", "b"):
        mock.lie(env.url(loc, a), RemoteStat(len(DATA), None))
    b = env.drive(env.add("run2/img.dat").id)
    assert b.state is not S.QUARANTINED, b.reason


def test_a_rule_gone_while_a_confirmed_file_is_kept_is_asked_again(make_env: Any, clock: Any) -> None:
    """R3: a rule whose lifetime ran out during `keep` (or that was deleted) was never asked again:
    the file was held for ever, flagged, and the lake's copies were protected by nothing."""
    env = make_env(rule={"delete": "keep", "keep_hours": 2})
    env.lake.rule_state = CopiesState.OK
    rec = env.drive(env.add().id)
    assert rec.state is S.CONFIRMED and rec.lake_ref
    env.lake.rules.clear()                     # the rule's lifetime ran out
    for _ in range(3):
        clock.advance(2 * 3600)
        if rec.state is S.CONFIRMED:
            rec = env.step(rec.id)
    assert env.lake.rules, "nobody asked the lake for the copies again"
    assert rec.state is S.DELETED and rec.lake_ref in env.lake.rules
    assert "rule_recreated" in env.events(rec.id)


def test_a_name_the_lake_holds_with_other_bytes_gives_the_file_a_versioned_name(env: Env) -> None:
    """R4 (review 2026-12-07): a name the catalogue held with other content, with nothing at the
    agent's destinations (an older night's DID whose copies lie elsewhere; a lost ledger), kept the
    rendered name and was refused at registration: quarantined instead of versioned."""
    old = LakeFile(rule="r", scope="test", name="run42/f1.fits", dataset=None, size=3, adler32="00000001",
                   md5=None, blake3="x", copies=2, destinations=("a", "b"), local_path="/nowhere")
    env.lake.dids[old.did] = old
    end = env.drive(env.add().id)
    assert end.state is S.DELETED, end.reason
    assert end.name != "run42/f1.fits" and end.name.startswith("run42/f1")
    assert env.lake.dids[old.did] is old                    # the lake's file untouched


def test_a_change_found_by_a_step_whose_file_another_agent_holds_is_that_step_outdated(env: Env) -> None:
    """Review of 2026-12-07 (claims, 6): recording "the file changed" refused by the fence escaped
    guarded() and failed the whole batch."""
    from edge_agent.errors import FileChanged
    from edge_agent.steps.failures import guarded
    rec = env.add()
    env.ctx.holder = "a1"
    env.ledger.claim("a2", [rec.state], env.clock(), 1, lease_s=60)

    def work(r: FileRecord, ctx: StepContext) -> None:
        raise FileChanged("it changed")
    assert guarded(rec, env.ctx, work) is None
    assert env.ledger.get(rec.id).state is rec.state


def test_a_step_writes_and_unlinks_nothing_once_its_claim_is_no_longer_firmly_held(env: Env) -> None:
    """A shared ledger fences commits; effects outside it (a copy written, the local file unlinked)
    are started only while the step's claim is firmly held (claims.ClaimBook)."""
    firm = {"yes": False}
    env.ctx.holder = "a1"
    env.ctx.claim_firm = lambda file_id: firm["yes"]
    rec = env.add()
    end = env.drive(rec.id)
    assert end.state is rec.state and "the claim of a1 is no longer firmly held" not in (end.reason or "")
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))   # nothing written
    firm["yes"] = True
    for _ in range(12):                               # up to the step that would delete it
        now = env.ledger.get(rec.id)
        if now.state in (S.TRANSFERRED, S.CONFIRMED) or now.state not in WORKING:
            break
        env.step(rec.id)
    firm["yes"] = False
    end = env.drive(rec.id)
    assert end.state is not S.DELETED and (env.daq / "run42/f1.fits").read_bytes() == DATA


def test_a_file_hashed_on_another_host_of_a_shared_buffer_is_deleted_there_too(env: Env) -> None:
    """A shared buffer is mounted on several hosts, each numbering its devices its own way: the
    st_dev recorded by the agent that hashed a file is not this host's. With claims the device is
    not part of the file's identity (inode, size, mtime and ctime are the same on every host)."""
    env.ctx.holder = "a1"
    rec = env.add()
    rec = env.step(rec.id)                            # hashed here ...
    with env.ledger._tx() as db:                      # ... as if on a host that numbers the device otherwise
        db.execute("UPDATE files SET dev = ?, claim_owner = 'a1', claim_until = ? WHERE id = ?",
                   ((rec.dev or 0) + 1000, env.clock() + 3600, rec.id))     # and held by a1 (its runner claims)
    end = env.drive(rec.id)
    assert end.state is S.DELETED, (end.state, end.reason)
    assert not (env.daq / "run42/f1.fits").exists()


def test_an_agent_stalled_after_its_first_copy_never_removes_the_copy_the_new_holder_counted(
        env: Env, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of 2026-12-07 (fleet, 1): a1 stalls right after writing the first copy while hashing;
    a2 takes the file over, binds the name to these bytes, confirms both copies and deletes the
    file; a1 resumes, finds the file gone and removed the first copy a2 counted."""
    import dataclasses
    from edge_agent.claims import ClaimBook
    from edge_agent.steps import hash as hash_step
    rec = env.add()
    book = ClaimBook(60, clock)
    [mine] = env.ledger.claim("a1", [S.COMPLETE], clock(), 1, lease_s=60)
    book.held([mine.id], clock())
    ctx_a = dataclasses.replace(env.ctx, holder="a1", claim_firm=book.firm)
    ctx_b = dataclasses.replace(env.ctx, holder="a2", claim_firm=lambda fid: True)
    real_hit, stalled = hash_step.hit, []

    def stall(name: str) -> None:
        if name == "after_first_put" and not stalled:
            stalled.append(True)
            clock.advance(120)                     # a1 SIGSTOPped past its lease; a2 finishes the file
            [theirs] = env.ledger.claim("a2", [S.COMPLETE], clock(), 1, lease_s=60)
            for _ in range(10):
                r = env.ledger.get(theirs.id)
                if r.state not in WORKING and r.state is not S.RETRY_WAIT:
                    break
                if r.state is S.RETRY_WAIT:
                    clock.now = max(clock.now, r.next_at)
                    env.ledger.transition(r.id, S.RETRY_WAIT, E.RETRY_DUE)
                    continue
                steps.run([r], ctx_b)
            assert env.ledger.get(theirs.id).state is S.DELETED
        real_hit(name)
    monkeypatch.setattr(hash_step, "hit", stall)
    ctx_b.holder = None                            # a2's effects: not what this test looks at
    steps.run([mine], ctx_a)                       # SIGCONT: a1 goes on where it stopped
    end = env.ledger.get(rec.id)
    assert end.state is S.DELETED
    assert env.copy("a", end).read_bytes() == DATA and env.copy("b", end).read_bytes() == DATA


def test_a_writer_on_this_host_keeps_a_file_hashed_on_another_host_of_the_fleet(env: Env) -> None:
    """Review of 2026-12-07 (fleet, 2): the last guard before deletion looked the writer up by the
    device the hashing agent recorded: another host's numbering, so a writer here was never found."""
    import subprocess
    import sys
    from edge_agent.watch.writers import WriterTable
    env.ctx.holder = "a1"
    env.ctx.open_writers = WriterTable().writers
    rec = env.step(env.add().id)                   # hashed by a member on another host ...
    with env.ledger._tx() as db:                   # ... whose kernel numbers the device otherwise
        db.execute("UPDATE files SET dev = ? WHERE id = ?", ((rec.dev or 0) + 1000, rec.id))
    w = subprocess.Popen([sys.executable, "-c", f"import time; f = open({rec.fspath!r}, 'ab'); "
                          "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert w.stdout is not None and w.stdout.readline().strip() == b"open"
        end = env.drive(rec.id)                    # the DAQ on *this* host still writes it
        assert end.state is not S.DELETED and (env.daq / "run42/f1.fits").exists()
    finally:
        w.kill()
        w.wait()


def test_a_second_cleanup_of_an_ended_version_never_removes_the_next_versions_copy(
        env: Env, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of 2026-12-07 (fleet, 3): two agents finish one ended version's clean-up at once (the
    superseding agent's hook, another agent's finish_cleanups at its start); the first frees the
    name, a new version takes it and writes its first copy at the same URL: the second removed it."""
    import dataclasses
    v1 = env.add("f1.fits", b"first content " * 100)
    v1 = env.step(v1.id)                      # hashed: first copy at lake-a, recorded 'sent'
    assert v1.state is S.HASHED
    url = env.copy("a", v1)
    assert url.exists()
    # the DAQ rewrites the file; the agent that notices ends v1 ...
    p = env.daq / "f1.fits"
    p.write_bytes(b"second content, other bytes " * 100)
    ended = env.ledger.transition(v1.id, S.HASHED, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    st = os.stat(p)
    v2 = env.ledger.discover("r", os.fsencode(p), "f1.fits", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
    v2 = env.ledger.transition(v2.id, S.DISCOVERED, E.COMPLETED)
    assert env.ledger.ended_holders() == [v1.id]   # what a restarting agent's finish_cleanups() reads
    ctx_a = dataclasses.replace(env.ctx, holder="a1", claim_firm=lambda fid: True)
    ctx_c = dataclasses.replace(env.ctx, holder="a3", claim_firm=lambda fid: True)
    real = env.lake.recorded_locations
    seen = {"n": 0}

    def slow_catalogue(scope: str, name: str) -> Any:
        seen["n"] += 1
        if seen["n"] == 1:
            # agent a3's finish_cleanups() is here (it read v1's name 'removing' and its 'sent'
            # copy, and begin_removal said True) while agent a1's clean-up completes ...
            steps.discard_unregistered(env.ledger.get(v1.id), ctx_a)
            assert not url.exists()
            # ... and a1 hashes v2, whose template renders the same, now free, name
            [c] = env.ledger.claim("a1", [S.COMPLETE], clock(), 1, lease_s=60)
            steps.run([c], ctx_a)
            got = env.ledger.get(v2.id)
            assert got.state is S.HASHED and got.name == v1.name, (got.state, got.name)
            assert url.read_bytes().startswith(b"second content")
        return real(scope, name)

    monkeypatch.setattr(env.lake, "recorded_locations", slow_catalogue)
    steps.discard_unregistered(env.ledger.get(v1.id), ctx_c)         # a3's finish_cleanups
    assert url.exists(), "v2's first copy (name bound to v2, recorded 'sent') was deleted by v1's clean-up"


def test_a_stalled_cleanup_never_removes_a_copy_a_deleted_version_counted(
        env: Env, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with a3 stalled (SIGSTOP) between the catalogue's answer and its delete while
    v2 goes all the way: v2 is deleted from the buffer on 2 copies, then a3 removes one of them."""
    import dataclasses
    v1 = env.step(env.add("f1.fits", b"first content " * 100).id)
    url = env.copy("a", v1)
    p = env.daq / "f1.fits"
    p.write_bytes(b"second content, other bytes " * 100)
    env.ledger.transition(v1.id, S.HASHED, E.SUPERSEDED, {"reason": "changed"}, reason="changed")
    st = os.stat(p)
    v2 = env.ledger.discover("r", os.fsencode(p), "f1.fits", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
    env.ledger.transition(v2.id, S.DISCOVERED, E.COMPLETED)
    assert env.ledger.ended_holders() == [v1.id]
    ctx_a = dataclasses.replace(env.ctx, holder="a1", claim_firm=lambda fid: True)
    ctx_c = dataclasses.replace(env.ctx, holder="a3", claim_firm=lambda fid: True)
    real = env.lake.recorded_locations
    seen = {"n": 0}

    def answer_then_stall(scope: str, name: str) -> Any:
        seen["n"] += 1
        answer = real(scope, name)
        if seen["n"] == 1:          # a3 got its answer, then is SIGSTOPped; meanwhile:
            steps.discard_unregistered(env.ledger.get(v1.id), ctx_a)
            for _ in range(10):
                r = env.ledger.get(v2.id)
                if r.state is S.DELETED:
                    break
                if r.state is S.RETRY_WAIT:
                    clock.now = max(clock.now, r.next_at)
                    env.ledger.transition(r.id, S.RETRY_WAIT, E.RETRY_DUE)
                    continue
                steps.run([r], ctx_a)
            done = env.ledger.get(v2.id)
            assert done.state is S.DELETED and done.name == v1.name and not p.exists()
        return answer

    monkeypatch.setattr(env.lake, "recorded_locations", answer_then_stall)
    steps.discard_unregistered(env.ledger.get(v1.id), ctx_c)         # a3's finish_cleanups, resumed
    assert url.exists(), "a copy v2 was deleted locally on was removed by v1's stalled clean-up"


def test_the_local_file_is_unlinked_only_while_the_ledger_itself_gives_the_claim(env: Env) -> None:
    """Review of 2026-12-07 (fleet, 6): a step of the ledger's clock ends every lease at once, while
    each holder's own book (monotonic) still says firm: before the unlink the ledger is asked."""
    env.ctx.holder = "a1"
    rec = env.add()

    def hold(until: float) -> None:
        with env.ledger._tx() as db:
            db.execute("UPDATE files SET claim_owner = 'a1', claim_until = ? WHERE id = ?", (until, rec.id))
    hold(env.clock() + 3600)
    for _ in range(12):
        now = env.ledger.get(rec.id)
        if now.state in (S.TRANSFERRED, S.CONFIRMED) or now.state not in WORKING:
            break
        env.step(rec.id)
    hold(env.clock() + 1)                           # the ledger's clock stepped: a1's lease is all but over
    end = env.drive(rec.id)
    assert end.state is not S.DELETED and (env.daq / "run42/f1.fits").read_bytes() == DATA
    hold(env.clock() + 3600)                        # renewed: the deletion goes ahead
    assert env.drive(rec.id).state is S.DELETED
