"""Several agents share one buffer (issue 15): three agent processes, each with its own state
directory and agent id, on one buffer with a PostgreSQL ledger (and the local lake, its catalogue
shared). A DAQ writes a night while kill -9 hits random agents: nothing is lost, nothing deleted
before both copies hold its bytes, no copy is written more often than the kills explain, and the
files a dead agent held are finished by the others within its lease. An agent stopped (SIGSTOP)
past its lease commits nothing over the work of the agent that took its files."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import Daemon

from ..pgledger import schema_url

pytestmark = [pytest.mark.integration, pytest.mark.lake]

LEASE_S = 30.0
LAKES = ("lake1", "lake2")
PART = ".edge-agent-part"          # a copy being written (transfer/posix.py's temporary name)


class Fleet:
    """Agents sharing `shared`/buffer, `shared`/lake and one PostgreSQL ledger."""

    def __init__(self, tmp: Path, url: str, secret: Path, daemons: list[Daemon]) -> None:
        self.tmp, self.url, self.secret, self.daemons = tmp, url, secret, daemons
        self.shared = tmp / "shared"
        self.buffer = self.shared / "buffer" / "daq"
        self.buffer.mkdir(parents=True)
        self.lakes = {lk: self.shared / "lake" / lk for lk in LAKES}
        for p in self.lakes.values():
            p.mkdir(parents=True)
        self.agents: list[Daemon] = []

    def add(self, **top: Any) -> Daemon:
        i = len(self.agents)
        d = Daemon(self.tmp / f"agent{i}", destinations={lk: {"path": str(p)} for lk, p in self.lakes.items()},
                   rules={"daq": {"directory": str(self.buffer), "completion": ["renamed"]}},
                   lake={"catalog": str(self.shared / "catalog.sqlite")},
                   ledger={"url": self.url, "password_file": str(self.secret), "agent_id": f"agent{i}",
                           "lease_seconds": LEASE_S}, **top)
        self.agents.append(d)
        self.daemons.append(d)
        return d

    def ledger(self) -> Any:
        from edge_agent.ledger import Ledger
        return Ledger(self.url, password=self.secret.read_text().strip(), readonly=True)

    def rows(self) -> list[Any]:
        led = self.ledger()
        try:
            return list(led.iter_all())
        finally:
            led.close()

    def lake_copy(self, lk: str, rel: str) -> Path:
        return self.lakes[lk] / "test" / rel


@pytest.fixture
def fleet(lake: Any, tmp_path: Path, daemons: list[Daemon]) -> Iterator[Fleet]:
    for url, password in schema_url(lake):
        secret = tmp_path / "ledger.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        f = Fleet(tmp_path, url, secret, daemons)
        yield f
        for d in f.agents:       # stopped before the schema goes (the daemons fixture would be too late)
            if d.proc is not None and d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGCONT)
                d.stop()


class CopyWrites:
    """How many times each copy was written, seen by inotify on the lake directories: a write opens
    the copy's temporary file and then changes it (the bytes; a kill mid-way counts as well), so
    the first change after each open is one write begun. (Opening it without writing, as the
    clean-up of a temporary name does, is not.)"""

    def __init__(self, roots: dict[str, Path], subdirs: list[str]) -> None:
        from watchdog.events import FileModifiedEvent, FileOpenedEvent, FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver
        self.count: Counter[tuple[str, str]] = Counter()
        self.started: list[tuple[float, str]] = []      # (when, copy) of each write begun
        writes = self
        for root in roots.values():
            for sub in subdirs:    # made beforehand: a directory's first files come before its watch
                (root / "test" / sub).mkdir(parents=True, exist_ok=True)

        class Handler(FileSystemEventHandler):
            def __init__(self, lk: str, root: Path) -> None:
                self.lk, self.root = lk, root
                self.opened: set[str] = set()

            def on_opened(self, event: FileOpenedEvent) -> None:
                if os.fsdecode(event.src_path).endswith(PART):
                    self.opened.add(os.fsdecode(event.src_path))

            def on_modified(self, event: FileModifiedEvent) -> None:
                src = os.fsdecode(event.src_path)
                if src in self.opened:
                    self.opened.discard(src)
                    path = Path(src)
                    final = path.with_name(path.name[1:-len(PART)])       # "." + base + PART
                    rel = str(final.relative_to(self.root / "test"))
                    writes.count[(self.lk, rel)] += 1
                    writes.started.append((time.time(), f"{self.lk}:{rel}"))
        self.observer = InotifyObserver()
        for lk, root in roots.items():
            self.observer.schedule(Handler(lk, root), str(root), recursive=True)
        self.observer.start()

    def stop(self) -> None:
        time.sleep(0.5)            # the last events
        self.observer.stop()
        self.observer.join(10)


class Custody(threading.Thread):
    """Checks, over and over while the night goes on, that a file gone from the buffer has both its
    copies with its very bytes: a deletion before that is the failure this test looks for."""

    def __init__(self, fleet: Fleet, originals: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.fleet, self.originals = fleet, originals
        self.problems: list[str] = []
        self.done = threading.Event()
        self.checks = 0

    def run(self) -> None:
        while not self.done.wait(0.2):
            for rel, data in list(self.originals.items()):
                if (self.fleet.buffer / rel).exists():
                    continue
                for lk in LAKES:
                    try:
                        got = self.fleet.lake_copy(lk, rel).read_bytes()
                    except OSError:
                        got = None
                    if got != data:
                        self.problems.append(f"{rel} gone from the buffer, {lk}'s copy is "
                                             f"{'missing' if got is None else 'other bytes'}")
            self.checks += 1


def write_night(fleet: Fleet, rng: random.Random, n: int, originals: dict[str, bytes], pause: float) -> None:
    for i in range(n):
        data = rng.randbytes(rng.randint(20_000, 600_000))
        sub = fleet.buffer / f"run{i % 4}"
        sub.mkdir(exist_ok=True)
        (sub / f".f{i:03d}.fits.part").write_bytes(data)
        os.rename(sub / f".f{i:03d}.fits.part", sub / f"f{i:03d}.fits")
        originals[f"run{i % 4}/f{i:03d}.fits"] = data
        time.sleep(pause)


def wait(cond: Callable[[], Any], timeout: float, what: str, agents: list[Daemon]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                         + "\n".join(d.log.read_text()[-1500:] for d in agents))


def test_three_agents_share_a_night_through_a_kill9_storm(fleet: Fleet) -> None:
    agents = [fleet.add(bandwidth_mbps=6.0, transfer_workers=2, hash_workers=1) for _ in range(3)]
    for d in agents:
        d.start()
    rng = random.Random(1515)
    originals: dict[str, bytes] = {}
    writes = CopyWrites(fleet.lakes, [f"run{i}" for i in range(4)])
    custody = Custody(fleet, originals)
    custody.start()
    daq = threading.Thread(target=write_night, args=(fleet, rng, 60, originals, 0.15))
    daq.start()
    kills = 0
    try:
        for _ in range(8):
            time.sleep(rng.uniform(0.8, 2.5))
            victim = rng.choice(agents)
            victim.kill9()
            kills += 1
            time.sleep(rng.uniform(0.0, 1.0))
            victim.start()
        daq.join()
        # the last kill is for good: the files it held are finished by the other two within its lease
        dead = agents[0]
        held_before = {r.id for r in fleet.rows() if r.claim_owner == "agent0" and (r.claim_until or 0) > 0}
        dead.kill9()
        kills += 1
        killed_at = time.time()
        held = {r.id for r in fleet.rows() if r.claim_owner == "agent0" and (r.claim_until or 0) > 0} | held_before
        wait(lambda: all(r.state.value == "deleted" for r in fleet.rows()) and len(fleet.rows()) == 60,
             240, "all 60 files deleted by the fleet", agents)
    finally:
        custody.done.set()
        custody.join(10)
        writes.stop()
    assert custody.checks > 10 and custody.problems == [], custody.problems[:5]
    rows = {r.id: r for r in fleet.rows()}
    assert sorted(r.relpath for r in rows.values()) == sorted(originals)        # one version each, nothing else
    # every copy is there with its bytes, and nothing else is in the lake (no temporary left over)
    for lk, root in fleet.lakes.items():
        found = {str(p.relative_to(root / "test")): p.read_bytes() for p in (root / "test").rglob("*") if p.is_file()}
        assert found == originals, f"{lk}: {sorted(set(found) ^ set(originals))[:5]}"
    assert not [n for n in os.listdir(fleet.buffer) if not (fleet.buffer / n).is_dir() and not n.startswith(".edge-agent-")]
    # no copy written more often than the kills explain: a kill repeats at most the copy each of the
    # agent's workers had in flight (the hashing step's first copy, or the transfer step's last)
    extra = {k: n - 1 for k, n in writes.count.items() if n > 1}
    assert all(n <= kills for n in extra.values()), extra
    assert sum(extra.values()) <= kills * 3, (kills, extra)
    assert set(writes.count) == {(lk, rel) for lk in LAKES for rel in originals}
    # the dead agent's files were finished by the others, within its lease (and the steps after it)
    led = fleet.ledger()
    try:
        for fid in held:
            deleted_at = [h["at"] for h in led.history(fid) if h["to_state"] == "deleted"]
            assert deleted_at and deleted_at[0] - killed_at < LEASE_S + 30, (fid, deleted_at, killed_at)
        agents_seen = {a["agent_id"]: a for a in led.agents()}
    finally:
        led.close()
    assert set(agents_seen) == {"agent0", "agent1", "agent2"}
    for d in agents[1:]:
        assert d.stop() == 0
        assert "Traceback" not in d.log.read_text()


def test_an_agent_stopped_past_its_lease_commits_nothing_over_the_new_owners_work(fleet: Fleet) -> None:
    """SIGSTOP while its steps hold files; the other agent takes them once the lease has run out;
    SIGCONT: the stalled agent's steps find their claims gone and commit nothing (a copy it was
    writing may be finished: nothing fences a write in progress, and it is the same bytes), the
    new owner finishes every file, and the stalled agent goes on working."""
    slow, other = fleet.add(bandwidth_mbps=1.0, transfer_workers=2, hash_workers=1), fleet.add()
    slow.start()
    originals: dict[str, bytes] = {}
    write_night(fleet, random.Random(77), 6, originals, 0.0)
    wait(lambda: any(r.claim_owner == "agent0" and (r.claim_until or 0) > 0 for r in fleet.rows()), 30,
         "agent0 at work", [slow])
    assert slow.proc is not None
    slow.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        stalled = {r.id for r in fleet.rows() if r.claim_owner == "agent0" and (r.claim_until or 0) > 0}
        assert stalled
        other.start()
        # the lease runs out on the server's clock; then the other agent claims the files
        wait(lambda: all(r.claim_owner == "agent1" for r in fleet.rows() if r.id in stalled), LEASE_S + 30,
             "agent1 taking over agent0's files", [other])
        assert time.time() - stopped_at > LEASE_S - 2
    finally:
        slow.proc.send_signal(signal.SIGCONT)
    resumed_at = time.time()
    wait(lambda: len(rows := fleet.rows()) == 6 and all(r.state.value == "deleted" for r in rows), 90,
         "every file delivered after the stall", [slow, other])
    for lk in LAKES:
        for rel, data in originals.items():
            assert fleet.lake_copy(lk, rel).read_bytes() == data
    time.sleep(5)                                        # agent0's steps in flight wake up meanwhile
    # agent0 learnt at its first renewal that its claims were taken ...
    assert any(e.get("event") == "claims lost to another agent; their steps will commit nothing"
               for e in slow.events()), slow.log.read_text()[-3000:]
    # ... and no step's result was committed twice (a stale step's over the new owner's): each file
    # hashed once, copied once, deleted once, whichever agent did it
    for r in fleet.rows():
        states = [h["to_state"] for h in fleet_history(fleet, r.id)]
        assert [states.count(s) for s in ("hashed", "copied", "deleted")] == [1, 1, 1], states
    assert "Traceback" not in slow.log.read_text()
    assert slow.proc.poll() is None                    # still running, and working: a new file goes through
    other.stop()
    (fleet.buffer / ".late.part").write_bytes(b"late" * 1000)
    os.rename(fleet.buffer / ".late.part", fleet.buffer / "late.fits")
    wait(lambda: any(r.relpath == "late.fits" and r.state.value == "deleted" for r in fleet.rows()), 60,
         "a file after the stall", [slow])
    assert slow.stop() == 0


def fleet_history(fleet: Fleet, fid: int) -> list[Any]:
    led = fleet.ledger()
    try:
        return led.history(fid)
    finally:
        led.close()


def test_a_second_agent_on_the_local_lake_must_share_its_catalogue(fleet: Fleet) -> None:
    first = fleet.add()
    first.doc["lake"] = {}                                   # a catalogue of its own, in its state_dir
    from support import write_toml
    write_toml(first.config, first.doc)
    first.start()
    second = fleet.add()
    second.doc["lake"] = {}
    write_toml(second.config, second.doc)
    # (the first agent's heartbeat names its rules)
    wait(lambda: any(a["stats"].get("rules") for a in fleet_agents(fleet)), 40, "a heartbeat", [first])
    out = second.cli("run")
    assert out.returncode != 0 and "lake.catalog: other agents share this ledger (agent0)" in out.stderr, out.stderr
    assert first.stop() == 0


def fleet_agents(fleet: Fleet) -> list[dict[str, Any]]:
    led = fleet.ledger()
    try:
        return led.agents()
    finally:
        led.close()
