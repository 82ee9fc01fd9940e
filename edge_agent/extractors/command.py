"""A command extractor: the DAQ team's program, run with the file's path as its last argument.

No shell: the argv is run as given. The program runs in a session of its own (so a timeout kills
it and everything it started), from `/`, with stdin from /dev/null and a minimal environment (PATH,
LANG, and what the rule's `env` adds: nothing of the agent's own, which may hold credentials). It
must print one JSON object on stdout and exit 0 within the timeout; stdout is read up to
MAX_OUTPUT_BYTES and stderr's end is kept for the reason an operator reads.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ExtractorFailed, ShuttingDown
from .output import MAX_OUTPUT_BYTES

BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
STDERR_KEPT = 16 << 10          # bytes of stderr held while it runs (its end)
REASON_CHARS = 600              # of that, in a quarantine reason
_POLL_S = 0.25                  # how often a shutdown is looked for while waiting


def run(argv: Sequence[str], path: str, timeout_s: float, env: Mapping[str, str] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        monotonic: Callable[[], float] = time.monotonic) -> Any:
    """Run `argv + [path]`; what it printed on stdout, parsed as JSON (not checked further).
    ExtractorFailed for a non-zero exit or a signal (with its stderr), a timeout, output over
    MAX_OUTPUT_BYTES or not JSON; ShuttingDown when `stopping()` turns true meanwhile (the program
    is killed; the hashing step is repeated at the next start)."""
    try:
        proc = subprocess.Popen([*argv, path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd="/", env={**BASE_ENV, **(env or {})},
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        raise ExtractorFailed(f"{argv[0]} could not be started: {exc.strerror or exc}") from None
    out, err = bytearray(), bytearray()
    deadline = monotonic() + timeout_s
    try:
        why = _collect(proc, out, err, deadline, stopping, monotonic)
        if why is None:
            try:
                proc.wait(max(deadline - monotonic(), 0.0))
            except subprocess.TimeoutExpired:   # closed its output, still running
                why = "timeout"
    finally:
        if proc.returncode is None:
            # the whole session: a shell script's children too. The leader is not reaped yet, so
            # its process group id cannot have been given to anyone else.
            _kill_group(proc)
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    if why == "stopping":
        raise ShuttingDown("shutting down: the extractor was stopped")
    if why == "timeout":
        raise ExtractorFailed(f"timed out after {timeout_s:g} s (killed){_tail(err)}")
    if why == "too much":
        raise ExtractorFailed(f"printed more than {MAX_OUTPUT_BYTES} bytes on stdout (killed){_tail(err)}")
    if proc.returncode < 0:
        raise ExtractorFailed(f"killed by signal {-proc.returncode}{_tail(err)}")
    if proc.returncode != 0:
        raise ExtractorFailed(f"exit status {proc.returncode}{_tail(err)}")
    try:
        return json.loads(out.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as exc:
        shown = bytes(out[:80]).decode("utf-8", "replace")
        raise ExtractorFailed(f"its stdout is not JSON ({exc}): {shown!r}{_tail(err)}") from None


def _collect(proc: subprocess.Popen[bytes], out: bytearray, err: bytearray, deadline: float,
             stopping: Callable[[], bool], monotonic: Callable[[], float]) -> str | None:
    """Read stdout and stderr until both end; None, or why it was cut short."""
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            if stopping():
                return "stopping"
            left = deadline - monotonic()
            if left <= 0:
                return "timeout"
            for key, _ in sel.select(min(left, _POLL_S)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                buf += chunk
                if buf is out and len(out) > MAX_OUTPUT_BYTES:
                    return "too much"
                if buf is err and len(err) > STDERR_KEPT:
                    del err[:len(err) - STDERR_KEPT]
    return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(err: bytearray) -> str:
    """The end of stderr, on one line, for a reason: where a program says what went wrong."""
    text = " | ".join(line.strip() for line in bytes(err).decode("utf-8", "replace").splitlines() if line.strip())
    if not text:
        return ""
    return "; stderr: " + (text if len(text) <= REASON_CHARS else "..." + text[-REASON_CHARS:])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
