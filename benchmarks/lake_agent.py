"""The whole agent against the loopback lake (Rucio + XRootD over HTTP), timed end to end.

A run: the agent starts and is idle; the files (prepared beforehand in `src`) are hard-linked
into the buffer under a temporary name and renamed, as a DAQ does; the clock runs from the first
rename until the last buffer file is deleted (after Rucio confirmed its replica), or until the
time budget runs out. The agent's /proc/<pid>/io and its own byte counters are read before and
after, so one run also says how many times each byte was read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Agent, data_files, empty, loopback_only, proc_io, rss_mb


@dataclass
class Run:
    files: int                 # files given
    done: int                  # files deleted from the buffer (confirmed) within the budget
    nbytes: int                # bytes of the files done
    seconds: float
    io: dict[str, int] = field(default_factory=dict)        # /proc/<pid>/io delta
    counters: dict[str, float] = field(default_factory=dict)  # /metrics delta
    rss_mb: float = 0.0
    names: list[str] = field(default_factory=list)

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def files_s(self) -> float:
        return self.done / self.seconds


def lake_file(lake: Any, rse_dir: str, name: str) -> Path:
    """Where XRootD keeps scope:name on a deterministic RSE of scripts/lake (lfn2pfn `hash`),
    computed here: asking Rucio for 20,000 PFNs would cost more than the run."""
    h = hashlib.md5(f"{lake.scope}:{name}".encode()).hexdigest()
    return lake.data_dir / "data" / rse_dir / lake.scope / h[0:2] / h[2:4] / name


def profile(pid: int, tag: str) -> subprocess.Popen[bytes] | None:
    """EDGE_BENCH_PYSPY=DIR: sample the agent with py-spy for the whole run (collapsed stacks in
    DIR/<tag>.txt, to read with benchmarks/pyspy_top.py). Sampling costs the agent a few percent."""
    out = os.environ.get("EDGE_BENCH_PYSPY")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not out or not os.path.exists(spy):
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    print(f"py-spy: {out}/{tag}.txt", flush=True)
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "50", "--threads", "--format", "raw",
                             "--output", f"{out}/{tag}.txt", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def agent_e2e(lake: Any, src: list[Path], base: Path, *, md5: bool = False, workers: int = 4,
              budget: float = 600, extra: dict[str, Any] | None = None, copies: int = 1,
              destination: dict[str, Any] | None = None, hash_workers: int = 2,
              rule: dict[str, Any] | None = None) -> Run:
    """The agent end to end on `src`; `copies` destinations (the lake's RSEs, over HTTP) written by
    the agent, each with the settings in `destination` (e.g. isolate_requests), the rule with those
    in `rule` (e.g. rule_per)."""
    loopback_only(lake.url, lake.http_url)
    tag = "b" + uuid.uuid4().hex[:8]
    buf = base / f"buffer-{tag}"
    buf.mkdir()
    doc: dict[str, Any] = {
        "state_dir": str(base / f"state-{tag}"), "transfer_workers": workers, "hash_workers": hash_workers,
        "tick_seconds": 0.2, "confirm_interval_seconds": 1, "rescan_seconds": 600,
        "lake": lake.agent_lake_config(),
        "destinations": {f"lake{i + 1}": {"kind": "rse", "rse": lake.lake_rses[i], "scheme": "http",
                                          **(destination or {})} for i in range(copies)},
        "rules": {"bench": {"directory": str(buf), "scope": lake.scope, "completion": ["renamed"],
                            "name_template": f"{tag}.{{filename}}", "dataset_template": f"{tag}.ds",
                            "destinations": [f"lake{i + 1}" for i in range(copies)], "copies": copies,
                            "md5": md5, **(rule or {})}},
        **(extra or {})}
    (base / f"state-{tag}").mkdir()
    agent = Agent(base / f"state-{tag}", doc).start()
    names = [f"{tag}.{f.name}" for f in src]
    try:
        agent.wait_healthy()
        time.sleep(1.0)   # let the start-up work (first rescan, lake check) finish before counting
        io0, m0 = proc_io(agent.pid), agent.metrics()
        spy = profile(agent.pid, tag)
        t0 = time.perf_counter()
        for f in src:
            os.link(f, buf / (f.name + ".part"))      # the bytes are there at once, as after a write
            os.rename(buf / (f.name + ".part"), buf / f.name)
        while not empty(buf) and time.perf_counter() - t0 < budget:
            agent.alive()
            time.sleep(0.05)
        took = time.perf_counter() - t0
        if spy is not None:
            spy.send_signal(signal.SIGINT)     # py-spy writes its profile on SIGINT
            spy.wait(60)
        io1, m1, rss = proc_io(agent.pid), agent.metrics(), rss_mb(agent.pid)
        left = {p.name for p in data_files(buf)}
        done = [f for f in src if f.name not in left]
        if len(done) < len(src):
            # the run is the evidence of why: keep the agent's log (its state dir is removed below)
            keep = Path("/var/tmp/edge-bench-logs")
            keep.mkdir(exist_ok=True)
            shutil.copy(agent.log, keep / f"{tag}.log")
            print(f"{len(src) - len(done)} files not done in {budget:.0f} s; agent log kept in "
                  f"{keep / (tag + '.log')}", flush=True)
        return Run(len(src), len(done), sum(f.stat().st_size for f in done), took,
                   {k: io1[k] - io0.get(k, 0) for k in io1}, {k: m1.get(k, 0) - m0.get(k, 0) for k in m1},
                   rss, names)
    finally:
        agent.stop()
        shutil.rmtree(buf, ignore_errors=True)
        for n in names:       # the lake's copies: the dev lake is shared and its disk is not ours to fill
            for i in range(copies):
                try:
                    lake_file(lake, f"lake{i + 1}", n).unlink()
                except FileNotFoundError:
                    pass
        shutil.rmtree(base / f"state-{tag}", ignore_errors=True)
