"""watchdog (inotify on Linux) feeding a bounded set of paths to look at.

Events are hints, never the truth: each dirty path is looked at again (lstat) before
anything is decided, and when the set overflows it is dropped and a full rescan is
asked for instead, so memory stays bounded whatever the DAQ does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Callable

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent,
                             FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent,
                             FileMovedEvent, FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

# watchdog warns when a directory is re-added under a recursive watch (a new run directory
# arriving); harmless for us, and it would otherwise land on stderr beside the JSON logs.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


class DirtyPaths:
    """The paths filesystem events named since the last take, with their rule (bounded: past
    `limit` they are dropped and `overflowed` says a rescan must find them), and the closes-after-write seen."""
    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._paths: dict[bytes, str] = {}     # path -> rule
        self.overflowed = False
        # the file as it was (inode, size, mtime_ns) at its last close-after-write, bounded like the set:
        # a close counts while the file is still exactly that (no wall clock compared with an mtime)
        self.closed_as: dict[bytes, tuple[int, int, int]] = {}

    def add(self, path: bytes, rule: str) -> None:
        with self._lock:
            if len(self._paths) >= self.limit:
                self._paths.clear()
                self.overflowed = True
            self._paths[path] = rule

    def closed(self, path: bytes, rule: str) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            st = None   # gone already (renamed, removed): its new name has a close of its own, or not
        with self._lock:
            if len(self.closed_as) >= self.limit:
                self.closed_as.clear()
            if st is None:
                self.closed_as.pop(path, None)
            else:
                self.closed_as[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.add(path, rule)

    def closed_after_change(self, path: bytes, inode: int | None, size: int | None, mtime_ns: int | None) -> bool:
        """A close-after-write was seen, and the file has not changed since."""
        with self._lock:
            return self.closed_as.get(path) == (inode, size, mtime_ns)

    def take(self) -> tuple[dict[bytes, str], bool]:
        with self._lock:
            paths, over = self._paths, self.overflowed
            self._paths, self.overflowed = {}, False
            return paths, over

    def forget_closed(self, path: bytes) -> None:
        with self._lock:
            self.closed_as.pop(path, None)


# What is asked of the kernel: writes, closes after writing, names coming and going. Not opens
# and closes without writing: the agent's own reads of every file (hashing, uploads, rechecks)
# would come back as events, several per file, each woken, queued and dispatched for nothing.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
    DirCreatedEvent, DirModifiedEvent, DirDeletedEvent, DirMovedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, rule: str, dirty: DirtyPaths, on_dir: Callable[[str], None]) -> None:
        self.rule, self.dirty, self.on_dir = rule, dirty, on_dir

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if isinstance(event, DirMovedEvent) or (event.is_directory and event.event_type in ("created", "moved")):
            # a whole directory arrived or moved: its files produce no events of their own
            self.on_dir(self.rule)
            return
        if event.is_directory:
            return
        src = os.fsencode(event.src_path)
        if isinstance(event, FileClosedEvent):
            self.dirty.closed(src, self.rule)
            return
        self.dirty.add(src, self.rule)
        if isinstance(event, FileSystemMovedEvent) and event.dest_path:
            self.dirty.add(os.fsencode(event.dest_path), self.rule)


class OverflowAlarm(logging.Handler):
    """The kernel's inotify queue overflowed (IN_Q_OVERFLOW): events were lost.

    watchdog rebuilds its watches after an overflow but tells its event handlers nothing; its
    log warning is the only signal, so that is what is listened to. Should the wording ever
    change, the periodic rescan still finds what was lost, only later.
    """

    def __init__(self, on_overflow: Callable[[], None], quiet_s: float = 0.5,
                 again: Callable[[], None] | None = None) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow
        self.again = again          # a message inside the quiet window: maybe a second overflow
        self.quiet_s = quiet_s      # one overflow is logged once per watch: count it once
        self._last = -1e9

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" not in record.getMessage().lower():
            return
        now = time.monotonic()
        if now - self._last >= self.quiet_s:
            self._last = now
            self.on_overflow()
        elif self.again is not None:
            # counted once, but never ignored: a rescan that already ran may have missed what this
            # overflow lost (a burst that goes on), so another one is asked for
            self.again()


class Watcher:
    """One observer for all rules; `rescan_wanted(rule)` is called when events cannot be trusted,
    `events_lost(overflows so far)` when the kernel dropped events (every rule needs a rescan;
    called again with the same count for more overflow messages close behind)."""

    def __init__(self, dirty: DirtyPaths, rescan_wanted: Callable[[str], None],
                 events_lost: Callable[[int], None] = lambda n: None) -> None:
        self.dirty = dirty
        self.rescan_wanted = rescan_wanted
        self.events_lost = events_lost
        self.observer: BaseObserver = Observer()
        self.watching: dict[str, str] = {}
        self.overflows = 0
        self.alarm = OverflowAlarm(self._overflowed, again=lambda: self.events_lost(self.overflows))

    def _overflowed(self) -> None:
        self.overflows += 1
        self.events_lost(self.overflows)

    def watch(self, rule: str, directory: str, recursive: bool) -> str | None:
        """Start watching; returns why not (the rescan still covers the directory)."""
        try:
            self.observer.schedule(_Handler(rule, self.dirty, self.rescan_wanted), directory,
                                   recursive=recursive, event_filter=WATCHED_EVENTS)
        except OSError as exc:
            return f"cannot watch {directory}: {exc}"
        self.watching[rule] = directory
        return None

    def start(self) -> None:
        logging.getLogger("watchdog").addHandler(self.alarm)
        self.observer.daemon = True
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
        logging.getLogger("watchdog").removeHandler(self.alarm)
