"""Who holds a file open for writing, read from /proc (Linux).

Used by the `closed` completion policy after a restart, when no close-after-write
event was seen for a file. Other users' processes can only be inspected by root;
when some could not be, the answer for a file not seen open is "cannot tell" (None).
"""

from __future__ import annotations

import os
import threading
import time

_ACCMODE = 0o3
_WRITE_MODES = {os.O_WRONLY, os.O_RDWR}


class WriterTable:
    """(dev, inode) -> number of write handles, refreshed at most every `max_age` seconds."""

    def __init__(self, proc: str = "/proc", max_age: float = 1.0) -> None:
        self.proc = proc
        self.max_age = max_age
        self._at = -1e9
        self._writers: dict[tuple[int, int], int] = {}
        self._complete = False
        self._me = os.getpid()
        self._lock = threading.Lock()   # the main loop and deleting workers both ask

    def writers(self, dev: int, inode: int) -> int | None:
        with self._lock:
            if time.monotonic() - self._at > self.max_age:
                self._refresh()
        n = self._writers.get((dev, inode), 0)
        if n:
            return n
        return 0 if self._complete else None

    def _refresh(self) -> None:
        writers: dict[tuple[int, int], int] = {}
        # with hidepid / ProtectProc=invisible other users' processes are simply absent: PID 1
        # always exists, so not seeing it means the view is partial
        complete = os.path.isdir(self.proc) and os.path.exists(f"{self.proc}/1")
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            pids, complete = [], False
        for pid in pids:
            if int(pid) == self._me:
                continue
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except FileNotFoundError:
                continue  # the process ended
            except PermissionError:
                complete = False
                continue
            for fd in fds:
                try:
                    with open(f"{self.proc}/{pid}/fdinfo/{fd}") as fh:
                        flags = next((int(line.split()[1], 8) for line in fh if line.startswith("flags:")), 0)
                    if flags & _ACCMODE not in _WRITE_MODES:
                        continue
                    st = os.stat(f"{fd_dir}/{fd}")
                except (OSError, ValueError):
                    continue
                key = (st.st_dev, st.st_ino)
                writers[key] = writers.get(key, 0) + 1
        self._writers, self._complete, self._at = writers, complete, time.monotonic()
