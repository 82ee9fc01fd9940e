"""From a file's completion to the start of its upload, with inotify (issue 5: median < 1 s).

    .venv/bin/python benchmarks/latency.py [--files 200] [--rate 5] [--size-kib 1024]

The local lake (one destination directory, one copy), default timing settings (tick_seconds 0.5,
rescan_seconds 60), completion policy `renamed`. Files are written under a temporary name and
renamed at --rate per second; the rename is the completion (its wall-clock time is noted). The
agent's ledger then says, per file, when it was judged complete (event `completed`) and when its
copy started (event `copy_written`: its time minus the copy's own `seconds`). Appends to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Agent, empty, exit_on_sigterm, load, verdict, write_section  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ledger_times(ledger: Path) -> dict[str, dict[str, float]]:
    """relpath -> {'completed': t, 'upload_start': t} from the agent's own ledger."""
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    out: dict[str, dict[str, float]] = {}
    for rel, event, at, detail in db.execute(
            "SELECT f.relpath, e.event, e.at, e.detail FROM events e JOIN files f ON f.id = e.file_id "
            "WHERE e.event IN ('completed', 'copy_written') ORDER BY e.id"):
        d = out.setdefault(rel, {})
        if event == "completed":
            d.setdefault("completed", at)
        else:
            d.setdefault("upload_start", at - float(json.loads(detail or "{}").get("seconds", 0)))
    db.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--rate", type=float, default=5.0, help="files completed per second")
    ap.add_argument("--size-kib", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=300)
    a = ap.parse_args(argv)
    exit_on_sigterm()
    start_load = load()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-latency-", dir="/var/tmp"))
    completed_at: dict[str, float] = {}
    try:
        buf, lake = work / "buffer", work / "lake"
        buf.mkdir()
        lake.mkdir()
        agent = Agent(work, {"state_dir": str(work / "state"),
                             "destinations": {"l1": {"path": str(lake)}},
                             "rules": {"lat": {"directory": str(buf), "scope": "bench", "destinations": ["l1"],
                                               "copies": 1, "completion": ["renamed"]}}}).start()
        try:
            agent.wait_healthy()
            payload = os.urandom(a.size_kib * 1024)
            t0 = time.perf_counter()
            for i in range(a.files):
                name = f"lat{i:05d}.fits"
                (buf / (name + ".part")).write_bytes(payload)
                # the moment the file is complete, on the clock the agent's ledger uses
                os.rename(buf / (name + ".part"), buf / name)
                completed_at[name] = time.time()
                time.sleep(max(0.0, t0 + (i + 1) / a.rate - time.perf_counter()))
            deadline = time.perf_counter() + a.budget
            while not empty(buf) and time.perf_counter() < deadline:
                agent.alive()
                time.sleep(0.1)
        finally:
            agent.stop()
        times = ledger_times(work / "state" / "ledger.sqlite")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    detect = [times[n]["completed"] - t for n, t in completed_at.items() if "completed" in times.get(n, {})]
    upload = [times[n]["upload_start"] - t for n, t in completed_at.items() if "upload_start" in times.get(n, {})]
    rows: list[tuple[Any, ...]] = []
    for what, xs, target in (("completion -> judged complete (ledger event `completed`)", detect, None),
                             ("completion -> upload starts (event `copy_written` minus its duration)", upload, 1.0)):
        if not xs:
            rows.append((what, "n/a", "n/a", "n/a", "0", "", ""))
            continue
        med = statistics.median(xs)
        rows.append((what, f"{med:.3f} s", f"{pct(xs, 99):.3f} s", f"{max(xs):.3f} s", len(xs),
                     "median < 1 s" if target else "", verdict(med < target) if target else ""))
    write_section("benchmarks/latency.py", [
        f"Load average at the start: {start_load}. Local lake (one destination directory), inotify (watchdog), "
        f"default tick_seconds 0.5; {a.files} files of {a.size_kib} KiB completed (renamed) at {a.rate:g}/s."],
        ("what", "median", "p99", "max", "files", "target", ""), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
