"""What every benchmark part shares: the machine, the agent as a process, its counters, the results file.

Benchmarks measure, they never assert. Each part refuses targets that are not on loopback, is
bounded in time, and removes what it created, also when killed (SIGTERM is turned into SystemExit
so the `finally` blocks run).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support import free_port, write_toml  # noqa: E402 - the tests' helpers, reused

from edge_agent.localfs import is_agent_temp  # noqa: E402

# EDGE_BENCH_RESULTS: elsewhere than RESULTS.md (a trial run, the smoke test)
RESULTS = Path(os.environ.get("EDGE_BENCH_RESULTS", HERE / "RESULTS.md"))
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MiB = 1 << 20


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def loopback_only(*urls: str) -> None:
    for u in urls:
        if urlsplit(u).hostname not in LOOPBACK:
            raise SystemExit(f"loopback only: {u}")


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"nproc": str(os.cpu_count()), "CPU": cpu, "kernel": platform.release(),
           "Python": platform.python_version()}
    for tool, args in (("xrdcp", ["--version"]), ("curl", ["--version"]), ("davix-put", ["--version"])):
        if shutil.which(tool):
            r = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
            out[tool] = ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0][:60]
    return out


def machine_line() -> str:
    return ", ".join(f"{k} {v}" for k, v in machine().items())


def rucio_version(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
            return r.read().decode().strip()
    except OSError as exc:
        return f"? ({exc})"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_file(path: Path, size: int, seed: int = 0) -> None:
    """Incompressible bytes, quickly: one random block, its head changed per block (no two files alike)."""
    block = bytearray(os.urandom(min(size, 64 * MiB)))
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            block[:16] = seed.to_bytes(8, "little") + i.to_bytes(8, "little")
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            i += 1


def proc_io(pid: int) -> dict[str, int]:
    """/proc/<pid>/io: rchar counts every byte read() returned (page cache included), read_bytes
    only what came from the disk."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k.strip()] = int(v)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Agent:
    """`edge-agent run` as a process with a status port, for a benchmark."""

    def __init__(self, base: Path, doc: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.base = base
        self.port = free_port()
        doc = {**doc, "status": {"port": self.port, **doc.get("status", {})}}
        doc.setdefault("log", {"level": "info", "format": "json"})   # the default, as deployed
        self.config = write_toml(base / "agent.toml", doc)
        self.log = base / "agent.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> "Agent":
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "-c", str(self.config), "run"],
                                         stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **self.env})
        return self

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/healthz")[0] == 200:
                return
            self.alive()
            time.sleep(0.1)
        raise RuntimeError(f"agent not healthy after {timeout}s:\n{self.tail()}")

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited ({self.proc.returncode}):\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def metrics(self) -> dict[str, float]:
        """Sums over labels of the counters a benchmark reads (bytes hashed, bytes sent)."""
        code, body = self.get("/metrics", timeout=60)
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            m = re.match(r"^(edge_agent_(?:hashed|sent)_bytes)_total(?:\{[^}]*\})? ([0-9.e+]+)$", line)
            if m:
                out[m[1]] = out.get(m[1], 0.0) + float(m[2])
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.05,
               alive: Callable[[], None] = lambda: None) -> float | None:
    """Seconds until cond() held, or None when the time budget ran out."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if cond():
            return time.perf_counter() - t0
        alive()
        time.sleep(poll)
    return None


def empty(d: Path) -> bool:
    """No data file left (the agent's own files, e.g. its buffer lock, do not count)."""
    with os.scandir(d) as it:
        return next((e for e in it if not is_agent_temp(e.name)), None) is None


def data_files(d: Path) -> list[Path]:
    """The files in `d` that are not the agent's own (its buffer lock, temporary names)."""
    return sorted(p for p in d.iterdir() if not is_agent_temp(p.name))


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def write_section(title: str, intro: list[str], header: tuple[str, ...], rows: list[tuple[Any, ...]],
                  results: Path | None = None) -> str:
    """Append a dated section (machine, load) to RESULTS.md and return it."""
    now = dt.datetime.now(dt.timezone.utc)
    text = [f"\n## {title}, {now:%Y-%m-%d %H:%M} UTC", "", f"Machine: {machine_line()}.  ", *intro, "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    out = "\n".join(text) + "\n"
    print(out, flush=True)
    with open(results or RESULTS, "a") as fh:
        fh.write(out)
    return out
