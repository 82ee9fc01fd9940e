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
