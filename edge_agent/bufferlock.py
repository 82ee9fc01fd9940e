"""One agent per buffer: a lock and a holder record in each watched directory.

Two agents on one buffer (a second state_dir on the same host, or another host on a shared
mount) would each ingest, copy and delete the same files. So each watched directory holds

    .edge-agent-buffer.lock   flock'ed for the agent's lifetime (the same host: exact)
    .edge-agent-buffer.json   {host, machine_id, pid, state_dir, started_at, heartbeat_at},
                              rewritten every HEARTBEAT_SECONDS (another host: flock may not
                              reach across a shared mount, a fresh heartbeat does)

The record is a file of its own because it is replaced atomically (rename) and a rename would
take the flock's inode away with it. Both names carry the agent mark: never ingested, never
reported. An agent refuses a buffer whose lock is held, or whose record names another host with
a heartbeat fresher than STALE_SECONDS; a stale record is taken over with a warning, and a record
of this host whose lock is free (the agent stopped or died) at once. A watched directory that does
not exist yet is claimed when it appears (Runner.may_scan), before anything in it is looked at.

A fleet (agents sharing one ledger: ledger.url or ledger.agent_id) shares its buffers: one
ledger per buffer rather than one agent. Each member holds the lock file with a shared flock
(several members on one host; an agent of its own keeps its exclusive one) and rewrites the record
with the ledger's fleet id, so that the record stays fresh while any member lives. An agent on
another ledger, or an agent of its own, is refused where the record names a fleet with a fresh
heartbeat, whichever host wrote it; a member is refused where it names an agent of its own or
another fleet. A member does not remove the record when it stops (the others may go on): after
the last one it goes stale.

A buffer is a whole tree: an agent also refuses a directory that lies inside a directory another
agent holds (its lock file flock'ed by another process, or a fresh record of another host), and,
the other way round, the rescan walk leaves out a subdirectory that another agent holds
(`held_by_another`, one lstat per directory where there is no lock file). The own lock is taken
before the directories above are looked at, so of two agents starting at once one always sees the
other: either the inner one sees the outer lock, or the outer one's walk sees the inner lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from . import identity
from .errors import ConfigError
from .localfs import AGENT_MARK

LOCK_NAME = AGENT_MARK.decode() + "buffer.lock"
RECORD_NAME = AGENT_MARK.decode() + "buffer.json"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0   # ten heartbeats: room for clock skew between hosts and a stalled NFS server

log = structlog.get_logger("edge_agent.bufferlock")


class BufferHeld(ConfigError):
    """Another agent holds a watched directory; the message names it and how to take over."""


@dataclass(frozen=True)
class Holder:
    """Who holds a buffer: the agent (host, machine, pid, state directory) and when it last said so."""
    host: str
    machine_id: str
    pid: int
    state_dir: str
    started_at: float
    heartbeat_at: float
    fleet: str | None = None   # the shared ledger's fleet id; None: an agent with a buffer of its own

    def same_host(self, other: Holder) -> bool:
        return (self.machine_id, self.host) == (other.machine_id, other.host)

    def same_agent(self, other: Holder) -> bool:
        return self.same_host(other) and (self.pid, self.state_dir) == (other.pid, other.state_dir)

    def who(self) -> str:
        """The holder without its heartbeat: the same text as long as the same agent holds."""
        fleet = f" (a fleet on ledger {self.fleet})" if self.fleet else ""
        return f"host {self.host} (machine-id {self.machine_id}), pid {self.pid}, state_dir {self.state_dir}{fleet}"

    def describe(self, now: float) -> str:
        return (f"{self.who()}, "
                f"last heartbeat {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.heartbeat_at))} "
                f"({now - self.heartbeat_at:.0f}s ago)")


UNNAMED = "a process on this host (no holder record)"


def read_record(directory: Path) -> Holder | None:
    """The holder record, or None if there is none or it cannot be understood."""
    try:
        doc = json.loads((directory / RECORD_NAME).read_bytes())
        fleet = doc.get("fleet")
        return Holder(str(doc["host"]), str(doc["machine_id"]), int(doc["pid"]), str(doc["state_dir"]),
                      float(doc["started_at"]), float(doc["heartbeat_at"]), str(fleet) if fleet else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(directory: Path, holder: Holder) -> None:
    # a name of this writer's own: members of a fleet on several hosts (pids repeat) write side by side
    tmp = directory / f"{RECORD_NAME}.{holder.host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(asdict(holder), sort_keys=True) + "\n")
        os.replace(tmp, directory / RECORD_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BufferLocks:
    """The locks of one agent on its rules' directories."""

    def __init__(self, directories: dict[str, Path], state_dir: Path, clock: Callable[[], float] = time.time,
                 stale_seconds: float = STALE_SECONDS, host: str | None = None,
                 machine_id: str | None = None, fleet: str | None = None,
                 shared_wait_s: float = 2.0) -> None:
        self.directories = directories
        self.clock = clock
        self.stale_seconds = stale_seconds
        self.fleet = fleet
        self.shared_wait_s = shared_wait_s
        now = clock()
        self.me = Holder(host or socket.gethostname(), machine_id or identity.machine_id(), os.getpid(),
                         str(state_dir), now, now, fleet)
        self._fds: dict[str, int] = {}
        self._held: set[str] = set()   # rules this agent has held: a refusal for one of them is a loss
        self.lost: str | None = None   # why this agent lost a buffer it held; it must stop
        self._mutex = threading.Lock()

    def claim_all(self) -> None:
        """At start: every existing directory, or none (BufferHeld names who holds which)."""
        refused = [p for rule in self.directories if (p := self.claim(rule))]
        if refused:
            self.release()
            raise BufferHeld("\n".join(refused))

    def claim(self, rule: str) -> str | None:
        """Hold `rule`'s directory. None when held (or when it does not exist: nothing to hold, and
        nothing to take from it); otherwise why not, naming the holder and how to take over. A refusal
        for a directory this agent held before is a loss: it is kept in `lost` as well."""
        with self._mutex:
            refused = self._claim(rule)
            if refused and rule in self._held and self.lost is None:
                self.lost = refused
            return refused

    def _claim(self, rule: str) -> str | None:
        # called with the mutex held
        directory = self.directories[rule]
        fd = self._fds.get(rule)
        if fd is not None:
            if _same_file(fd, directory / LOCK_NAME):
                return None
            os.close(self._fds.pop(rule))   # the directory was re-created: claim the new one
        if not directory.is_dir():
            return None
        try:
            fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            # an agent that cannot create a file in its buffer cannot delete any there either
            log.warning("buffer not locked: cannot create the lock file", rule=rule,
                        directory=str(directory), error=exc.strerror)
            return None
        now = self.clock()
        if not self._lock(fd):
            os.close(fd)
            held = read_record(directory)
            who = held.describe(now) if held else UNNAMED
            return self._refusal(rule, directory, who, running_here=True)
        held = read_record(directory)
        if held is not None and self._excludes(held, now):
            os.close(fd)
            return self._refusal(rule, directory, held.describe(now), running_here=held.same_host(self.me))
        # only now, holding our own lock (see the module's docstring for why in this order)
        own = self._own() | {_fd_identity(fd)}
        for above in Path(os.path.realpath(directory)).parents:
            taken, holder = self._holder(os.fsencode(above), own, now)
            if taken:
                os.close(fd)
                running_here = holder is None or holder.same_host(self.me)
                return self._refusal(rule, directory, holder.describe(now) if holder else UNNAMED,
                                     running_here, held_dir=above)
        try:
            _write_record(directory, Holder(**{**asdict(self.me), "heartbeat_at": now}))
        except OSError as exc:
            log.warning("buffer locked, but its holder record cannot be written", rule=rule,
                        directory=str(directory), error=exc.strerror)
        self._fds[rule] = fd
        self._held.add(rule)
        if held is None or held.same_agent(self.me) or (held.same_host(self.me)
                                                         and held.state_dir == self.me.state_dir):
            log.info("buffer locked", rule=rule, directory=str(directory))
        else:
            log.warning("buffer taken over from an agent that stopped or went silent", rule=rule,
                        directory=str(directory), previous=held.describe(now))
        return None

    def _lock(self, fd: int) -> bool:
        """flock the lock file: exclusive for an agent of its own, shared for a member of a fleet (a
        moment's exclusive lock is another member writing its record... or an agent of its own: the
        member waits up to shared_wait_s for it to go)."""
        if self.fleet is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                return False
        deadline = time.monotonic() + self.shared_wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def _excludes(self, held: Holder, now: float) -> bool:
        """Does the record `held` (in a directory this agent has just flock'ed) keep this agent out?
        A fresh record of a fleet keeps out all but its members, whichever host wrote it (each
        member rewrites it: it stays fresh while any lives). A fresh record of an agent of its own
        on another host keeps everyone out; on this host that agent would hold its exclusive flock,
        which this agent has just got past: it is gone."""
        if now - held.heartbeat_at >= self.stale_seconds:
            return False
        if held.fleet is not None:
            return held.fleet != self.fleet
        return not held.same_host(self.me)

    def _refusal(self, rule: str, directory: Path, who: str, running_here: bool,
                 held_dir: Path | None = None) -> str:
        record = (held_dir or directory) / RECORD_NAME
        how = ("stop that agent first" if running_here else
               f"stop that agent first; if its host is gone for good, start again once its heartbeat is "
               f"over {self.stale_seconds:.0f}s old (this agent then takes over with a warning), or remove "
               f"{record} to take over at once")
        if held_dir is not None:
            return (f"rules.{rule}.directory {directory}: lies inside {held_dir}, which another edge-agent "
                    f"holds as its buffer (it takes in this directory's files too): {who}; {how}")
        return f"rules.{rule}.directory {directory}: another edge-agent holds this buffer: {who}; {how}"

    def held_by_another(self, directory: bytes) -> str | None:
        """Who holds `directory` as its buffer if another agent does (its lock flock'ed by another
        process, or a fresh record of another host), else None (also for this agent's own locks).
        For the rescan walk: one lstat where there is no lock file; the text is the same each time."""
        with self._mutex:
            own = self._own()
        taken, holder = self._holder(directory, own, self.clock())
        if not taken:
            return None
        return holder.who() if holder else UNNAMED

    def _own(self) -> set[tuple[int, int]]:
        return {_fd_identity(fd) for fd in self._fds.values()}

    def _holder(self, directory: bytes, own: set[tuple[int, int]], now: float) -> tuple[bool, Holder | None]:
        """(held by another agent, its record if it has one) for the lock file in `directory`."""
        lock = os.path.join(directory, os.fsencode(LOCK_NAME))
        try:
            st = os.lstat(lock)
        except OSError:
            return False, None   # no lock file: nobody ever held this directory
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in own:
            return False, None
        held = read_record(Path(os.fsdecode(directory)))
        if held is not None and (held.same_agent(self.me) or (self.fleet and held.fleet == self.fleet)):
            return False, None   # this agent's, or its fleet's (members share buffers)
        if _flocked(lock):
            return True, held
        if held is not None and self._excludes(held, now):
            return True, held
        return False, None

    def heartbeat(self) -> str | None:
        """Rewrite heartbeat_at in every held record. Returns why this agent lost a buffer (another
        host took it over, believing this agent gone; or its lock file was removed or replaced and
        another agent holds it now), or None."""
        with self._mutex:
            if self.lost:
                return self.lost
            now = self.clock()
            for rule, fd in list(self._fds.items()):
                directory = self.directories[rule]
                if not _same_file(fd, directory / LOCK_NAME):
                    # The lock file was removed (a cleanup of old files) or replaced, or the directory
                    # re-created: until it is taken again another agent could claim this buffer while
                    # this one goes on. Take it again now; if another agent has it, this one lost it.
                    log.warning("buffer lock file gone or replaced; taking it again", rule=rule,
                                directory=str(directory))
                    refused = self._claim(rule)
                    if refused:
                        self.lost = refused
                        return refused
                    continue   # held again (its record just written), or the directory is gone
                held = read_record(directory)
                if held is not None and not held.same_agent(self.me) and (self.fleet is None
                                                                          or held.fleet != self.fleet):
                    self.lost = (f"rules.{rule}.directory {directory}: another edge-agent took this buffer "
                                 f"over: {held.describe(now)}")
                    return self.lost
                try:
                    _write_record(directory, Holder(**{**asdict(self.me), "heartbeat_at": now}))
                except OSError as exc:
                    log.warning("buffer heartbeat not written", rule=rule, directory=str(directory),
                                error=exc.strerror)
            return None

    def release(self) -> None:
        """At stop: the record is removed (another host need not wait for it to go stale), the lock
        file stays (removing a flock'ed file lets two agents lock two different files)."""
        with self._mutex:
            for rule, fd in self._fds.items():
                directory = self.directories[rule]
                held = read_record(directory)
                if self.fleet is None and held is not None and held.same_agent(self.me) \
                        and _same_file(fd, directory / LOCK_NAME):
                    try:
                        (directory / RECORD_NAME).unlink()
                    except OSError:
                        pass
                os.close(fd)
            self._fds.clear()


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _flocked(lock: bytes) -> bool:
    """Does another open file hold this lock? Tested with a shared lock on a fd of our own: it is
    refused while an exclusive one is held, and works on a read-only fd (NFS wants write access
    for an exclusive one). Released at once by closing the fd."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False   # a filesystem without flock: the record (another host) is what tells
    finally:
        os.close(fd)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
