"""An inotify queue overflow, which watchdog only logs, reaches the runner as 'events were lost'."""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.watch.events import DirtyPaths, OverflowAlarm, Watcher


def test_the_alarm_rings_once_per_overflow_and_ignores_other_warnings() -> None:
    rang: list[int] = []
    alarm = OverflowAlarm(lambda: rang.append(1), quiet_s=60)
    log = logging.getLogger("watchdog.observers.inotify_c")
    log.addHandler(alarm)
    try:
        log.warning("Unable to rebuild watches")
        assert rang == []
        log.warning("Inotify queue overflowed; filesystem events were lost")
        log.warning("Inotify queue overflowed; reconciling recursive watches below %r", b"/daq")
        assert rang == [1]                  # one overflow, logged twice, counted once
    finally:
        log.removeHandler(alarm)


def test_a_started_watcher_reports_lost_events_and_stops_listening_when_stopped(tmp_path: Path) -> None:
    lost: list[int] = []
    w = Watcher(DirtyPaths(), lambda rule: None, lost.append)
    assert w.watch("r", str(tmp_path), recursive=True) is None
    w.start()
    try:
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; events were lost")
        assert lost == [1] and w.overflows == 1
    finally:
        w.stop()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; events were lost")
    assert lost == [1]


def test_more_overflow_messages_close_behind_ask_for_another_rescan_without_counting_again(tmp_path: Path) -> None:
    """A burst that goes on overflows again after the first rescan ran: that must not be swallowed
    by the counting window, or files written after the rescan wait for the periodic one."""
    lost: list[int] = []
    w = Watcher(DirtyPaths(), lambda rule: None, lost.append)
    w.alarm.quiet_s = 60
    log = logging.getLogger("watchdog.observers.inotify_c")
    log.addHandler(w.alarm)
    try:
        log.warning("Inotify queue overflowed; events were lost")
        log.warning("Inotify queue overflowed; events were lost")
        assert lost == [1, 1] and w.overflows == 1
    finally:
        log.removeHandler(w.alarm)


def test_the_agents_own_reads_of_a_watched_file_raise_no_events(tmp_path: Path) -> None:
    """Hashing, uploading and rechecking open and read every file: with opens and closes without
    writing asked of the kernel, each came back as events, woken, queued and dispatched for nothing
    (several per file, a tenth of the agent's time in a night of small files)."""
    import time

    from watchdog.events import FileSystemEventHandler

    seen: list[str] = []

    class Count(FileSystemEventHandler):
        def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
            seen.append(event.event_type)

    (tmp_path / "f.fits").write_bytes(b"x" * 100)
    w = Watcher(DirtyPaths(), lambda rule: None)
    from edge_agent.watch.events import WATCHED_EVENTS
    w.observer.schedule(Count(), str(tmp_path), recursive=True, event_filter=WATCHED_EVENTS)
    w.start()
    try:
        time.sleep(0.2)
        for _ in range(20):
            (tmp_path / "f.fits").read_bytes()
        (tmp_path / "g.fits").write_bytes(b"y")      # a write still comes through
        deadline = time.monotonic() + 5
        while "closed" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        w.stop()
    assert "closed" in seen and "created" in seen
    assert "opened" not in seen and "closed_no_write" not in seen


def test_the_watcher_asks_only_for_the_events_it_uses(tmp_path: Path) -> None:
    w = Watcher(DirtyPaths(), lambda rule: None)
    assert w.watch("r", str(tmp_path), recursive=True) is None
    emitters = list(w.observer.emitters)
    assert emitters, "the watch is scheduled"
    names = {cls.__name__ for cls in emitters[0]._event_filter}   # watchdog keeps what it was asked
    assert "FileOpenedEvent" not in names and "FileClosedNoWriteEvent" not in names
    assert {"FileClosedEvent", "FileMovedEvent", "FileModifiedEvent", "FileCreatedEvent"} <= names
