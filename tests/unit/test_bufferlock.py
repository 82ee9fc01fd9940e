"""One agent per buffer (issue 12): a flock and a holder record with a heartbeat in each watched
directory; a second agent refuses and names the first; a stale holder is taken over, the same
agent restarting takes its buffer back at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent import bufferlock
from edge_agent.bufferlock import LOCK_NAME, RECORD_NAME, BufferHeld, BufferLocks, read_record
from edge_agent.localfs import is_agent_temp
from edge_agent.settings import Settings
from edge_agent.watch.filters import RuleFilter


def locks(tmp_path: Path, clock: Any, state: str = "state", **kw: Any) -> BufferLocks:
    return BufferLocks({"r": tmp_path / "daq"}, tmp_path / state, clock=clock, **kw)


def record(directory: Path, **fields: Any) -> None:
    doc = {"host": "daq2", "machine_id": "m2", "pid": 4242, "state_dir": "/srv/other", "started_at": 0.0,
           "heartbeat_at": 0.0, **fields}
    (directory / RECORD_NAME).write_text(json.dumps(doc))


@pytest.fixture
def daq(tmp_path: Path) -> Path:
    (tmp_path / "daq").mkdir()
    return tmp_path / "daq"


def test_a_second_holder_is_refused_and_told_who_holds_the_buffer(tmp_path: Path, daq: Path, clock: Any) -> None:
    first = locks(tmp_path, clock)
    first.claim_all()
    rec = read_record(daq)
    assert rec is not None and rec.pid == os.getpid() and rec.state_dir == str(tmp_path / "state")
    second = locks(tmp_path, clock, state="other-state")     # its own file descriptor: flock says no
    with pytest.raises(BufferHeld) as exc:
        second.claim_all()
    msg = str(exc.value)
    assert "rules.r.directory" in msg and f"pid {os.getpid()}" in msg and str(tmp_path / "state") in msg
    assert "stop that agent" in msg
    first.release()
    second.claim_all()                                       # free now
    assert read_record(daq).state_dir == str(tmp_path / "other-state")  # type: ignore[union-attr]
    second.release()


def test_a_holder_in_another_process_is_refused(tmp_path: Path, daq: Path, clock: Any) -> None:
    code = ("import sys; from pathlib import Path; from edge_agent.bufferlock import BufferLocks; "
            f"b = BufferLocks({{'r': Path({str(daq)!r})}}, Path({str(tmp_path / 'state-1')!r})); "
            "b.claim_all(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(bufferlock.__file__).parents[1])})
    try:
        assert holder.stdout is not None
        assert "held\n" in iter(holder.stdout.readline, "")     # after its log line
        with pytest.raises(BufferHeld, match=f"pid {holder.pid}, state_dir {tmp_path / 'state-1'}"):
            locks(tmp_path, clock).claim_all()
    finally:
        holder.communicate("", timeout=30)
    # it exited without releasing (as a killed agent would): its record stays, the flock went with it
    assert read_record(daq).pid == holder.pid  # type: ignore[union-attr]
    b = locks(tmp_path, clock)
    b.claim_all()                                            # same host, lock free: taken at once
    assert read_record(daq).pid == os.getpid()  # type: ignore[union-attr]
    b.release()


def test_another_host_with_a_fresh_heartbeat_is_refused_a_stale_one_taken_over(
        tmp_path: Path, daq: Path, clock: Any, capsys: pytest.CaptureFixture[str]) -> None:
    record(daq, heartbeat_at=clock() - 60)                   # a shared mount: flock does not reach daq2
    b = locks(tmp_path, clock, stale_seconds=300)
    with pytest.raises(BufferHeld) as exc:
        b.claim_all()
    msg = str(exc.value)
    assert "host daq2" in msg and "pid 4242" in msg and "/srv/other" in msg and "60s ago" in msg
    assert "300s" in msg and RECORD_NAME in msg                  # how to take over
    record(daq, heartbeat_at=clock() - 301)
    b.claim_all()
    assert "taken over" in capsys.readouterr().out
    assert read_record(daq).pid == os.getpid()  # type: ignore[union-attr]
    b.release()


def test_the_same_agent_restarting_takes_its_buffer_back_at_once(tmp_path: Path, daq: Path, clock: Any) -> None:
    b = locks(tmp_path, clock)
    me = b.me
    # the previous run of this agent (same host, same state_dir) died a moment ago: its heartbeat is fresh
    record(daq, host=me.host, machine_id=me.machine_id, pid=999_999, state_dir=me.state_dir,
           heartbeat_at=clock() - 1)
    b.claim_all()
    assert read_record(daq).pid == os.getpid()  # type: ignore[union-attr]
    b.release()


def test_the_heartbeat_is_rewritten_and_a_takeover_by_another_host_is_noticed(
        tmp_path: Path, daq: Path, clock: Any) -> None:
    b = locks(tmp_path, clock)
    b.claim_all()
    clock.advance(30)
    assert b.heartbeat() is None
    assert read_record(daq).heartbeat_at == clock()  # type: ignore[union-attr]
    (daq / RECORD_NAME).unlink()                             # removed by someone: written again
    assert b.heartbeat() is None and read_record(daq) is not None
    record(daq, heartbeat_at=clock())                        # daq2 thought this agent gone
    lost = b.heartbeat()
    assert lost is not None and "took this buffer over" in lost and "host daq2" in lost
    assert read_record(daq).host == "daq2"  # type: ignore[union-attr]   # not fought over
    b.release()
    assert read_record(daq).host == "daq2"  # type: ignore[union-attr]   # not ours to remove


def test_release_removes_the_record_and_keeps_the_lock_file(tmp_path: Path, daq: Path, clock: Any) -> None:
    b = locks(tmp_path, clock)
    b.claim_all()
    b.release()
    assert not (daq / RECORD_NAME).exists() and (daq / LOCK_NAME).exists()
    assert [p.name for p in daq.iterdir()] == [LOCK_NAME]   # no temporary file left behind


def test_a_directory_that_appears_later_is_claimed_then(tmp_path: Path, clock: Any) -> None:
    b = locks(tmp_path, clock)
    b.claim_all()                                            # nothing there: nothing to hold
    assert b.claim("r") is None
    (tmp_path / "daq").mkdir()
    other = locks(tmp_path, clock, state="other-state")
    assert other.claim("r") is None                          # the other agent got there first
    held = b.claim("r")
    assert held is not None and "other-state" in held
    other.release()
    assert b.claim("r") is None
    assert read_record(tmp_path / "daq").state_dir == str(tmp_path / "state")  # type: ignore[union-attr]
    b.release()


def test_a_re_created_directory_is_claimed_again(tmp_path: Path, daq: Path, clock: Any) -> None:
    b = locks(tmp_path, clock)
    b.claim_all()
    for p in daq.iterdir():
        p.unlink()
    daq.rmdir()
    daq.mkdir()
    assert b.claim("r") is None
    assert (daq / LOCK_NAME).exists() and read_record(daq) is not None
    assert locks(tmp_path, clock, state="other-state").claim("r") is not None
    b.release()


def test_the_lock_and_record_are_never_data_nor_a_writers_leftover(
        tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    filt = RuleFilter(Settings(**settings_data(tmp_path)).rules["r"])
    for name in (LOCK_NAME, RECORD_NAME, f"{RECORD_NAME}.123.tmp", f"sub/{LOCK_NAME}"):
        assert is_agent_temp(os.path.basename(name))
        skip = filt(name)
        assert skip is not None and not skip.report and not skip.writing, name


def test_stale_seconds_leave_room_for_several_heartbeats() -> None:
    assert bufferlock.STALE_SECONDS >= 5 * bufferlock.HEARTBEAT_SECONDS


@pytest.fixture
def runner(tmp_path: Path, clock: Any, settings_data: Callable[..., Any]) -> Any:
    from edge_agent.app import build_catalogue
    from edge_agent.ledger import Ledger
    from edge_agent.runner import Runner
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir(exist_ok=True)
    s = Settings(**settings_data(tmp_path, rule={"completion": ["renamed"]}, stale_temp_seconds=1))
    ledger = Ledger(s.ledger_path, clock=clock, synchronous="normal")
    r = Runner(s, ledger, build_catalogue(s), clock=clock)
    yield r
    for pool in r.pools.values():
        pool.shutdown()
    ledger.close()


def test_a_buffer_held_elsewhere_is_not_looked_into(runner: Any, tmp_path: Path, clock: Any) -> None:
    (tmp_path / "daq" / "f.fits").write_bytes(b"x")
    other = locks(tmp_path, clock, state="other-state")
    other.claim_all()
    mine = locks(tmp_path, clock)
    runner.discovery.may_scan = mine.claim
    runner.discovery.rescan("r")
    assert list(runner.ledger.iter_all()) == []
    assert "other-state" in runner.discovery.watch_problems["r"]
    other.release()
    runner.discovery.rescan("r")
    assert [rec.relpath for rec in runner.ledger.iter_all()] == ["f.fits"]
    mine.release()


def test_an_old_lock_file_is_never_reported_as_a_stale_temporary_file(runner: Any, tmp_path: Path,
                                                                      clock: Any) -> None:
    b = locks(tmp_path, clock)
    b.claim_all()
    (tmp_path / "daq" / ".half-written").write_bytes(b"x")
    for name in (LOCK_NAME, RECORD_NAME, ".half-written"):
        os.utime(tmp_path / "daq" / name, (clock() - 3600, clock() - 3600))
    runner.discovery.rescan("r")
    assert [os.path.basename(n["relpath"]) for n in runner.ledger.notices(10)] == [".half-written"]
    b.release()


def test_an_agent_whose_buffer_is_taken_over_stops_with_the_holder_named(
        tmp_path: Path, daq: Path, settings_data: Callable[..., Any]) -> None:
    from edge_agent.app import Agent
    for d in ("lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    agent = Agent(Settings(**settings_data(tmp_path, status={"enabled": False})))
    agent._heartbeat()
    assert agent.lost is None and read_record(daq).pid == os.getpid()  # type: ignore[union-attr]
    record(daq, heartbeat_at=read_record(daq).heartbeat_at)  # type: ignore[union-attr]   # daq2 took it
    agent._heartbeat()
    assert agent.lost is not None and agent.runner.stopping.is_set()
    with pytest.raises(BufferHeld, match="host daq2"):
        agent.run()
    assert read_record(daq).host == "daq2"  # type: ignore[union-attr]   # not removed: not ours


# ------------------------------------------------------------ a buffer inside another agent's buffer

def test_a_directory_inside_a_buffer_another_agent_holds_is_refused(tmp_path: Path, daq: Path,
                                                                     clock: Any) -> None:
    """The outer agent walks its tree recursively: it would ingest the inner directory's files too."""
    (daq / "cam2").mkdir()
    outer = locks(tmp_path, clock, state="outer-state")
    outer.claim_all()
    inner = BufferLocks({"cam2": daq / "cam2"}, tmp_path / "inner-state", clock=clock)
    with pytest.raises(BufferHeld) as exc:
        inner.claim_all()
    msg = str(exc.value)
    assert "rules.cam2.directory" in msg and f"lies inside {daq}," in msg, msg
    assert f"pid {os.getpid()}" in msg and str(tmp_path / "outer-state") in msg and "stop that agent" in msg
    assert read_record(daq / "cam2") is None                 # refused before anything was written
    outer.release()
    inner.claim_all()                                        # the lock file stays, nobody holds it
    assert read_record(daq / "cam2").state_dir == str(tmp_path / "inner-state")  # type: ignore[union-attr]
    inner.release()


def test_a_directory_inside_a_buffer_of_another_host_is_refused_while_its_heartbeat_is_fresh(
        tmp_path: Path, daq: Path, clock: Any) -> None:
    (daq / "cam2").mkdir()
    (daq / LOCK_NAME).touch()
    record(daq, heartbeat_at=clock() - 60)                   # a shared mount: flock does not reach daq2
    inner = BufferLocks({"cam2": daq / "cam2"}, tmp_path / "state", clock=clock, stale_seconds=300)
    with pytest.raises(BufferHeld) as exc:
        inner.claim_all()
    assert "host daq2" in str(exc.value) and str(daq / RECORD_NAME) in str(exc.value)
    record(daq, heartbeat_at=clock() - 301)
    inner.claim_all()
    inner.release()


def test_held_by_another_names_a_foreign_holder_and_never_this_agent(tmp_path: Path, daq: Path,
                                                                      clock: Any) -> None:
    (daq / "cam2").mkdir()
    mine = locks(tmp_path, clock)
    mine.claim_all()
    cam2 = os.fsencode(daq / "cam2")
    assert mine.held_by_another(cam2) is None                # no lock file there
    assert mine.held_by_another(os.fsencode(daq)) is None    # our own lock
    # the other agent, started first, holds cam2 (as when the outer agent was stopped meanwhile)
    other = BufferLocks({"cam2": daq / "cam2"}, tmp_path / "other-state", clock=clock)
    other._fds["cam2"] = fd = os.open(daq / "cam2" / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    who = mine.held_by_another(cam2)
    assert who is not None and "no holder record" in who
    bufferlock._write_record(daq / "cam2", other.me)
    who = mine.held_by_another(cam2)
    assert who is not None and "other-state" in who and "ago" not in who   # the same text every rescan
    assert other.held_by_another(cam2) is None               # its own
    other.release()
    assert mine.held_by_another(cam2) is None                # stopped: the lock file stays, nobody holds it
    record(daq / "cam2", heartbeat_at=clock() - 10)          # another host, fresh
    assert "host daq2" in (mine.held_by_another(cam2) or "")
    mine.release()


class _Pools:
    """Records what would be run instead of running it."""

    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def submit(self, fn: Any, *args: Any) -> None:
        self.submitted.extend(args[1])     # (pool, batch): the files of the step handed over

    def shutdown(self, **kw: Any) -> None:
        pass


def test_a_subdirectory_another_agent_holds_is_left_to_it(runner: Any, tmp_path: Path, clock: Any) -> None:
    """The other order: the inner agent started first. The outer one's walk leaves the inner tree
    out (one notice, naming the holder), events there are ignored, and rows there from an earlier
    run are never hashed, copied or deleted; once the inner agent stops, its files are taken in."""
    from edge_agent.core.lifecycle import Event, State
    daq = tmp_path / "daq"
    (daq / "cam2" / "night").mkdir(parents=True)
    (daq / "f.fits").write_bytes(b"x")
    (daq / "cam2" / "g.fits").write_bytes(b"y")
    (daq / "cam2" / "night" / "h.fits").write_bytes(b"z")
    inner = BufferLocks({"cam2": daq / "cam2"}, tmp_path / "inner-state", clock=clock)
    inner.claim_all()
    mine = locks(tmp_path, clock)
    mine.claim_all()
    runner.discovery.may_scan = mine.claim
    runner.discovery.held_by_another = mine.held_by_another
    # a row of an earlier run of this agent (before the inner agent started), due for hashing
    st = (daq / "cam2" / "night" / "h.fits").stat()
    old = runner.ledger.discover("r", os.fsencode(daq / "cam2" / "night" / "h.fits"), "cam2/night/h.fits",
                                 st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
    runner.ledger.transition(old.id, State.DISCOVERED, Event.COMPLETED, next_at=0)
    pools = runner.pools = {"hash": _Pools(), "transfer": _Pools(), "lake": _Pools()}
    runner.capacity["hash"] = 10
    runner.dispatch(clock())                                 # before any rescan: asked of the filesystem
    assert pools["hash"].submitted == []
    runner.discovery.rescan("r")
    assert [rec.relpath for rec in runner.ledger.iter_all()] == ["cam2/night/h.fits", "f.fits"]
    [notice] = runner.ledger.notices(10)
    assert notice["relpath"] == str(daq / "cam2") and notice["kind"] == "held-elsewhere"
    assert "inner-state" in notice["detail"]
    runner.discovery.rescan("r")
    assert runner.ledger.notices(10)[0]["count"] == 2 and len(runner.ledger.notices(10)) == 1
    runner.discovery.dirty.add(os.fsencode(daq / "cam2" / "new.fits"), "r")      # an event there
    (daq / "cam2" / "new.fits").write_bytes(b"n")
    runner.discovery.process_events()
    assert len(list(runner.ledger.iter_all())) == 2
    clock.advance(3600)
    runner.dispatch(clock())
    assert [rec.relpath for rec in pools["hash"].submitted] == ["f.fits"]   # its own files go ahead
    assert runner.ledger.get(old.id).next_at > clock()      # out of the way of the others meanwhile
    # the inner agent stops: the next rescan takes its files in, the notice goes
    inner.release()
    runner.discovery.rescan("r")
    assert sorted(rec.relpath for rec in runner.ledger.iter_all()) == [
        "cam2/g.fits", "cam2/new.fits", "cam2/night/h.fits", "f.fits"]
    assert runner.ledger.notices(10) == []
    clock.advance(3600)
    runner.in_flight.clear()
    runner.dispatch(clock())
    assert old.id in [rec.id for rec in pools["hash"].submitted]
    mine.release()


# ------------------------------------------------------------ the lock file removed under a running agent

def test_a_removed_lock_file_taken_by_another_agent_is_reported_as_lost(tmp_path: Path, daq: Path,
                                                                       clock: Any) -> None:
    a = locks(tmp_path, clock, "state-a")
    a.claim_all()
    os.unlink(daq / LOCK_NAME)               # a cleanup of old files (the lock file's mtime never changes)
    b = locks(tmp_path, clock, "state-b")
    b.me = bufferlock.Holder(**{**b.me.__dict__, "pid": b.me.pid + 1})   # another agent of this host
    b.claim_all()                            # a new lock file, nobody flocks it: b holds the buffer
    lost = a.heartbeat()
    assert lost is not None and f"state_dir {tmp_path / 'state-b'}" in lost
    assert a.heartbeat() == lost             # and stays lost
    assert read_record(daq).state_dir == str(tmp_path / "state-b")  # type: ignore[union-attr]
    b.release()
    a.release()


def test_a_removed_lock_file_nobody_else_took_is_taken_again(tmp_path: Path, daq: Path, clock: Any) -> None:
    a = locks(tmp_path, clock, "state-a")
    a.claim_all()
    os.unlink(daq / LOCK_NAME)
    (daq / RECORD_NAME).unlink()
    clock.advance(30)
    assert a.heartbeat() is None and a.lost is None
    assert (daq / LOCK_NAME).exists() and read_record(daq).heartbeat_at == clock()  # type: ignore[union-attr]
    b = locks(tmp_path, clock, "state-b")
    b.me = bufferlock.Holder(**{**b.me.__dict__, "pid": b.me.pid + 1})
    with pytest.raises(BufferHeld):          # the new lock file is flock'ed by a again
        b.claim_all()
    assert a.claim("r") is None and a.heartbeat() is None
    a.release()


def test_a_rescan_refused_a_buffer_it_held_stops_the_agent(
        tmp_path: Path, daq: Path, settings_data: Callable[..., Any], clock: Any) -> None:
    from edge_agent.app import Agent
    for d in ("lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    agent = Agent(Settings(**settings_data(tmp_path, status={"enabled": False})))
    os.unlink(daq / LOCK_NAME)
    b = locks(tmp_path, clock, "state-b")
    b.me = bufferlock.Holder(**{**b.me.__dict__, "pid": b.me.pid + 1})
    b.claim_all()
    rule = next(iter(agent.settings.rules))
    agent.runner.discovery.rescan(rule)                # the claim is refused: the buffer was this agent's
    assert agent.lost is not None and agent.runner.stopping.is_set()
    with pytest.raises(BufferHeld, match="state-b"):
        agent.run()
    b.release()


# ---------------------------------------------------------------- one ledger per buffer (issue 15)

def test_members_of_one_fleet_share_a_buffer_and_others_are_refused(tmp_path: Path, daq: Path,
                                                                      clock: Any) -> None:
    """A shared ledger's agents share its buffers: each holds the lock file with a shared flock and
    rewrites the record with the fleet's id. An agent of its own, or of another fleet, is refused."""
    m1 = locks(tmp_path, clock, state="m1", fleet="F1", shared_wait_s=0.1)
    m2 = locks(tmp_path, clock, state="m2", fleet="F1", shared_wait_s=0.1)
    m1.claim_all()
    m2.claim_all()                                            # the same fleet: both in
    assert read_record(daq).fleet == "F1"  # type: ignore[union-attr]
    alone = locks(tmp_path, clock, state="alone")
    with pytest.raises(BufferHeld) as exc:                    # an agent of its own: refused
        alone.claim_all()
    assert "a fleet on ledger F1" in str(exc.value)
    other = locks(tmp_path, clock, state="other", fleet="F2", shared_wait_s=0.1)
    with pytest.raises(BufferHeld):                           # another fleet: refused
        other.claim_all()
    # a member stopping leaves the record to the others (it stays fresh while any lives)
    m1.release()
    clock.advance(30)
    assert m2.heartbeat() is None and read_record(daq).fleet == "F1"  # type: ignore[union-attr]
    m2.release()
    assert read_record(daq) is not None                       # after the last one it goes stale ...
    with pytest.raises(BufferHeld):
        locks(tmp_path, clock, state="alone-2").claim_all()
    clock.advance(301)                                        # ... then an agent of its own takes over
    alone = locks(tmp_path, clock, state="alone-3")
    alone.claim_all()
    assert read_record(daq).fleet is None  # type: ignore[union-attr]
    alone.release()


def test_a_fleet_member_is_refused_where_an_agent_of_its_own_holds_the_buffer(
        tmp_path: Path, daq: Path, clock: Any) -> None:
    alone = locks(tmp_path, clock, state="alone")
    alone.claim_all()                                         # its exclusive flock: this host
    member = locks(tmp_path, clock, state="m1", fleet="F1", shared_wait_s=0.1)
    with pytest.raises(BufferHeld):
        member.claim_all()
    alone.release()
    record(daq, heartbeat_at=clock() - 10)                    # another host's, fresh: flock does not reach it
    with pytest.raises(BufferHeld) as exc:
        member.claim_all()
    assert "host daq2" in str(exc.value)
    record(daq, heartbeat_at=clock() - 10, fleet="F1")        # a member on another host: welcome
    member.claim_all()
    member.release()


def test_a_fleet_record_taken_over_by_an_agent_of_its_own_is_noticed_by_the_members(
        tmp_path: Path, daq: Path, clock: Any) -> None:
    member = locks(tmp_path, clock, state="m1", fleet="F1")
    member.claim_all()
    record(daq, heartbeat_at=clock(), fleet="F1", host="daq3")   # another member's heartbeat: fine
    assert member.heartbeat() is None
    record(daq, heartbeat_at=clock())                         # an agent of its own on daq2 took it over
    lost = member.heartbeat()
    assert lost is not None and "took this buffer over" in lost
    member.release()


def test_a_buffer_of_a_fleet_is_not_held_elsewhere_for_its_members(tmp_path: Path, daq: Path,
                                                                    clock: Any) -> None:
    """Nested buffers: a subdirectory a member of this agent's fleet holds is this fleet's (not left
    out of the walk); a fleet's subdirectory is another's for an agent of its own, on any host."""
    (daq / "cam2").mkdir()
    inner = BufferLocks({"cam2": daq / "cam2"}, tmp_path / "inner", clock=clock, fleet="F1")
    inner.claim_all()
    member = locks(tmp_path, clock, state="m1", fleet="F1")
    assert member.held_by_another(os.fsencode(daq / "cam2")) is None
    alone = locks(tmp_path, clock, state="alone")
    assert alone.held_by_another(os.fsencode(daq / "cam2")) is not None
    inner.release()
