"""A buffer tree of 1,000,000 files already there when the agent starts (issue 5).

    .venv/bin/python benchmarks/scale.py [--files 1000000] [--dirs 1000] [--budget 900]

Targets: time to the first upload < 30 s, full rescan < 60 s, resident memory with 1,000,000 files
in the ledger < 150 MB. The local lake (one destination directory, one copy): what is measured is
the agent's own side (walk, ledger, scheduling), not a catalogue.

The tree: --dirs directories of tiny files (16 bytes each, all different). The agent starts on it;
the clock starts when the process is started. Measured:
  first upload    the first copy appearing in the lake directory
  full rescans    the agent's own log line `rescanned` (entries, seconds), info level: the first one
                  discovers every file (1,000,000 rows written), the next one (rescan_seconds = 30)
                  walks the tree against a ledger that already holds them
  RSS             VmRSS of the agent, sampled each second; its value after the second rescan and the most
The run stops after the second rescan or at --budget, and removes the tree (also when killed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Agent, exit_on_sigterm, load, rss_mb, verdict, write_section  # noqa: E402


def make_tree(buf: Path, files: int, dirs: int) -> None:
    per = -(-files // dirs)
    n = 0
    for d in range(dirs):
        sub = buf / f"run{d:04d}"
        sub.mkdir()
        for i in range(min(per, files - n)):
            fd = os.open(sub / f"f{i:05d}.fits", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, n.to_bytes(16, "little"))
            os.close(fd)
            n += 1


def any_file(d: Path) -> bool:
    for _, _, fs in os.walk(d):
        if fs:
            return True
    return False


def rescans(log: Path) -> list[dict[str, Any]]:
    out = []
    with open(log, errors="replace") as fh:
        for line in fh:
            if '"rescanned"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--budget", type=float, default=900, help="seconds the agent may run")
    ap.add_argument("--rescan-seconds", type=float, default=30, help="the agent's rescan_seconds")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the agent, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    a = ap.parse_args(argv)
    exit_on_sigterm()
    start_load = load()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-scale-", dir="/var/tmp"))
    rss: list[tuple[float, float]] = []
    res: dict[str, Any] = {}
    try:
        buf, lake = work / "buffer", work / "lake"
        buf.mkdir()
        lake.mkdir()
        t = time.perf_counter()
        make_tree(buf, a.files, a.dirs)
        res["make"] = time.perf_counter() - t
        print(f"tree of {a.files} files made in {res['make']:.0f} s", flush=True)
        agent = Agent(work, {"state_dir": str(work / "state"), "rescan_seconds": a.rescan_seconds,
                             "log": {"level": "info", "format": "json"},
                             "destinations": {"l1": {"path": str(lake)}},
                             "rules": {"scale": {"directory": str(buf), "scope": "bench", "destinations": ["l1"],
                                                 "copies": 1, "completion": ["renamed"]}}},
                      env=dict(kv.split("=", 1) for kv in a.env))
        stop = threading.Event()
        t0 = time.perf_counter()
        agent.start()

        def sample() -> None:
            while not stop.is_set():
                try:
                    rss.append((time.perf_counter() - t0, rss_mb(agent.pid)))
                except OSError:
                    return
                stop.wait(1.0)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            while time.perf_counter() - t0 < a.budget:
                agent.alive()
                if "first_upload" not in res and any_file(lake):
                    res["first_upload"] = time.perf_counter() - t0
                    print(f"first upload after {res['first_upload']:.1f} s", flush=True)
                scans = rescans(agent.log)
                if len(scans) >= 2 and "first_upload" in res:
                    break
                time.sleep(0.2)
            res["rss_end"] = rss_mb(agent.pid)
            res["ran"] = time.perf_counter() - t0
        finally:
            stop.set()
            agent.stop()
        res["scans"] = rescans(agent.log)
    finally:
        t = time.perf_counter()
        shutil.rmtree(work, ignore_errors=True)
        print(f"tree removed in {time.perf_counter() - t:.0f} s", flush=True)
    scans = res["scans"]
    first = res.get("first_upload")
    s1 = scans[0]["seconds"] if scans else None
    s2 = scans[1]["seconds"] if len(scans) > 1 else None
    peak = max((r for _, r in rss), default=float("nan"))
    rows: list[tuple[Any, ...]] = [
        ("time to the first upload (from process start)", f"{first:.1f} s" if first else
         f"none in {res['ran']:.0f} s", "< 30 s", verdict(bool(first and first < 30))),
        ("first full rescan: walk + discover every file (ledger rows written)",
         f"{s1:.1f} s ({scans[0]['entries']:,} entries)" if s1 is not None else f"not finished in {res['ran']:.0f} s",
         "", ""),
        ("full rescan with every file already in the ledger", f"{s2:.1f} s ({scans[1]['entries']:,} entries)"
         if s2 is not None else f"not finished in {res['ran']:.0f} s", "< 60 s", verdict(s2 is not None and s2 < 60)),
        (f"agent RSS at the end ({res['ran']:.0f} s after start)", f"{res['rss_end']:.0f} MB", "< 150 MB",
         verdict(res["rss_end"] < 150)),
        ("agent RSS, most seen (sampled each second)", f"{peak:.0f} MB", "", ""),
    ]
    write_section("benchmarks/scale.py", [
        f"Load average at the start: {start_load}. Local lake, {a.files:,} files of 16 bytes in {a.dirs} "
        f"directories (made in {res['make']:.0f} s), present before the agent starts; rescan_seconds {a.rescan_seconds:g}"
        + (f"; agent environment {' '.join(a.env)}." if a.env else ".")],
        ("what", "result", "target", ""), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
