"""How many times the agent reads each byte it uploads (issue 5: target <= 1.01).

    EDGE_LAKE_ENV=/var/tmp/edge-lake-dev/lake.env .venv/bin/python benchmarks/read_once.py [--files 3] [--size-mib 1024]

Runs the real agent (a process) on a few large files to the loopback lake and reads, before and
after, its /proc/<pid>/io (rchar: every byte read() returned, page cache included; read_bytes: from
the disk only) and its own counters on /metrics (edge_agent_hashed_bytes, edge_agent_sent_bytes).
rchar also counts the agent's small reads (HTTP answers, SQLite pages, /proc): a few MB at most,
well under 1 % of a GiB file. Appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MiB, exit_on_sigterm, load, make_file, write_section  # noqa: E402
from lake_agent import Run, agent_e2e  # noqa: E402


def read_rows(run: Run, label: str) -> list[tuple[Any, ...]]:
    """The rows of the read-once figure for one agent run: the counters, then the ratio."""
    # bytes of the files confirmed; a run cut short by its budget sent more than that (partial and
    # retried uploads), so its ratio is over what was read against what was sent, and says so
    up = run.nbytes if run.done == run.files else int(run.counters.get("edge_agent_sent_bytes", 0))
    label += "" if run.done == run.files else " (cut short: per byte sent)"
    rchar = run.io.get("rchar", 0)
    hashed = run.counters.get("edge_agent_hashed_bytes", 0)
    sent = run.counters.get("edge_agent_sent_bytes", 0)
    r = rchar / up if up else float("nan")
    return [
        (label, "bytes uploaded (files confirmed and deleted)", f"{up:,}", "", "", ""),
        (label, "agent rchar (/proc/<pid>/io)", f"{rchar:,}", f"{r:.3f}", "<= 1.01",
         "met" if r <= 1.01 else "**missed**"),
        (label, "agent read_bytes (from disk; files were in page cache)", f"{run.io.get('read_bytes', 0):,}",
         "", "", ""),
        (label, "edge_agent_hashed_bytes (/metrics)", f"{hashed:,.0f}", f"{hashed / up:.3f}" if up else "", "", ""),
        (label, "edge_agent_sent_bytes (/metrics)", f"{sent:,.0f}", f"{sent / up:.3f}" if up else "", "", ""),
    ]


HEADER = ("run", "counter", "bytes", "/ bytes uploaded", "target", "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--md5", action="store_true", help="rule with md5 = true")
    ap.add_argument("--budget", type=float, default=300)
    a = ap.parse_args(argv)
    exit_on_sigterm()
    from lake import start_lake
    lakes = start_lake()
    lake = next(lakes)
    started_load = load()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-read-", dir="/var/tmp"))
    try:
        src = work / "src"
        src.mkdir()
        files = []
        for i in range(a.files):
            files.append(src / f"r{i:02d}.fits")
            make_file(files[-1], a.size_mib * MiB, seed=i)
        run = agent_e2e(lake, files, work, md5=a.md5, budget=a.budget)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        next(lakes, None)
    label = f"{run.done}/{run.files} x {a.size_mib} MiB{' +md5' if a.md5 else ''}"
    write_section("benchmarks/read_once.py", [
        f"Load average at the start: {started_load}. Agent (HTTP to XRootD, Rucio register/rule/confirm, delete) "
        f"on {a.files} x {a.size_mib} MiB in page cache; {run.seconds:.1f} s, {run.mb_s:,.0f} MB/s end to end."],
        HEADER, read_rows(run, label))
    return 0 if run.done == run.files else 1


if __name__ == "__main__":
    sys.exit(main())
