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
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
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
    host: str
    machine_id: str
    pid: int
    state_dir: str
    started_at: float
    heartbeat_at: float

    def same_host(self, other: Holder) -> bool:
        return (self.machine_id, self.host) == (other.machine_id, other.host)

    def same_agent(self, other: Holder) -> bool:
        return self.same_host(other) and (self.pid, self.state_dir) == (other.pid, other.state_dir)

    def describe(self, now: float) -> str:
        return (f"host {self.host} (machine-id {self.machine_id}), pid {self.pid}, state_dir {self.state_dir}, "
                f"last heartbeat {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.heartbeat_at))} "
                f"({now - self.heartbeat_at:.0f}s ago)")


def read_record(directory: Path) -> Holder | None:
    """The holder record, or None if there is none or it cannot be understood."""
    try:
        doc = json.loads((directory / RECORD_NAME).read_bytes())
        return Holder(str(doc["host"]), str(doc["machine_id"]), int(doc["pid"]), str(doc["state_dir"]),
                      float(doc["started_at"]), float(doc["heartbeat_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(directory: Path, holder: Holder) -> None:
    tmp = directory / f"{RECORD_NAME}.{os.getpid()}.tmp"
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
                 machine_id: str | None = None) -> None:
        self.directories = directories
        self.clock = clock
        self.stale_seconds = stale_seconds
        now = clock()
        self.me = Holder(host or socket.gethostname(), machine_id or identity.machine_id(), os.getpid(),
                         str(state_dir), now, now)
        self._fds: dict[str, int] = {}
        self._mutex = threading.Lock()

    def claim_all(self) -> None:
        """At start: every existing directory, or none (BufferHeld names who holds which)."""
        refused = [p for rule in self.directories if (p := self.claim(rule))]
        if refused:
            self.release()
            raise BufferHeld("\n".join(refused))

    def claim(self, rule: str) -> str | None:
        """Hold `rule`'s directory. None when held (or when it does not exist: nothing to hold, and
        nothing to take from it); otherwise why not, naming the holder and how to take over."""
        with self._mutex:
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
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                held = read_record(directory)
                who = held.describe(now) if held else "a process on this host (no holder record)"
                return self._refusal(rule, directory, who, running_here=True)
            held = read_record(directory)
            if held is not None and not held.same_host(self.me) and now - held.heartbeat_at < self.stale_seconds:
                os.close(fd)
                return self._refusal(rule, directory, held.describe(now), running_here=False)
            try:
                _write_record(directory, Holder(**{**asdict(self.me), "heartbeat_at": now}))
            except OSError as exc:
                log.warning("buffer locked, but its holder record cannot be written", rule=rule,
                            directory=str(directory), error=exc.strerror)
            self._fds[rule] = fd
            if held is None or held.same_agent(self.me) or (held.same_host(self.me)
                                                             and held.state_dir == self.me.state_dir):
                log.info("buffer locked", rule=rule, directory=str(directory))
            else:
                log.warning("buffer taken over from an agent that stopped or went silent", rule=rule,
                            directory=str(directory), previous=held.describe(now))
            return None

    def _refusal(self, rule: str, directory: Path, who: str, running_here: bool) -> str:
        how = ("stop that agent first" if running_here else
               f"stop that agent first; if its host is gone for good, start again once its heartbeat is "
               f"over {self.stale_seconds:.0f}s old (this agent then takes over with a warning), or remove "
               f"{directory / RECORD_NAME} to take over at once")
        return f"rules.{rule}.directory {directory}: another edge-agent holds this buffer: {who}; {how}"

    def heartbeat(self) -> str | None:
        """Rewrite heartbeat_at in every held record. Returns why this agent lost a buffer (another
        host took it over, believing this agent gone), or None."""
        with self._mutex:
            now = self.clock()
            for rule, fd in self._fds.items():
                directory = self.directories[rule]
                if not _same_file(fd, directory / LOCK_NAME):
                    continue   # the directory was re-created: the next rescan claims it again
                held = read_record(directory)
                if held is not None and not held.same_agent(self.me):
                    return (f"rules.{rule}.directory {directory}: another edge-agent took this buffer over: "
                            f"{held.describe(now)}")
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
                if held is not None and held.same_agent(self.me) and _same_file(fd, directory / LOCK_NAME):
                    try:
                        (directory / RECORD_NAME).unlink()
                    except OSError:
                        pass
                os.close(fd)
            self._fds.clear()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
