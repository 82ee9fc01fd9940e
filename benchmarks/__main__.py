"""Every benchmark of issue 5, one command; each part selectable and bounded in time.

    EDGE_LAKE_ENV=/var/tmp/edge-lake-dev/lake.env .venv/bin/python -m benchmarks [--only large,small] [--quick]

Parts (each is also a script of its own, with its options: `benchmarks/<part>.py --help`):
  read_once   bytes the agent reads per byte it uploads (/proc/<pid>/io, /metrics)      lake
  large       4 x 1 GiB end to end against curl -T, xrdcp, davix-put; +md5             lake
  small       20,000 x 64 KiB end to end against xrdcp -r --parallel 4, rucio upload   lake
  latency     completion -> upload start, median and p99, inotify                       local lake
  scale       1,000,000 files present at start: first upload, rescans, RSS              local lake
  s3          the S3 store through Rucio-signed URLs against curl -T (scripts/lake/s3-start.sh)
  fleet       1, 2, 3 agents on one buffer (issue 15): files/s ratios, each agent capped    lake's PostgreSQL
The default runs issue 5's parts; s3 and fleet only when named in --only.
Each part runs as its own process, is stopped (SIGTERM: it cleans up) when its time is up, and
appends its section to benchmarks/RESULTS.md (EDGE_BENCH_RESULTS=PATH: elsewhere). --quick runs
tiny sizes to check that the parts work (its results go to a temporary file unless
EDGE_BENCH_RESULTS is set). Figures are reported, never asserted: see docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# part: (script, arguments, quick arguments, seconds it may take)
PARTS: dict[str, tuple[str, list[str], list[str], float]] = {
    "read_once": ("read_once.py", [], ["--files", "1", "--size-mib", "16", "--budget", "60"], 600),
    "large": ("large.py", [], ["--files", "1", "--size-mib", "16", "--budget", "60"], 1200),
    "small": ("small.py", [], ["--files", "40", "--rucio-files", "3", "--ceiling-files", "40", "--budget", "60"], 1800),
    "latency": ("latency.py", [], ["--files", "10", "--rate", "20", "--size-kib", "4"], 600),
    "scale": ("scale.py", [], ["--files", "2000", "--dirs", "4", "--rescan-seconds", "1", "--budget", "60"], 1800),
    "s3": ("s3_upload.py", [], ["--files", "1", "--size-mb", "4"], 1200),
    "fleet": ("fleet.py", [], ["--files", "6", "--size-mib", "1", "--host-mbps", "8", "--budget", "120"], 2400),
}
DEFAULT = ["read_once", "large", "small", "latency", "scale"]


def run_part(name: str, quick: bool, env: dict[str, str]) -> int:
    script, args, quick_args, limit = PARTS[name]
    cmd = [sys.executable, str(HERE / script), *(quick_args if quick else args)]
    print(f"\n=== {name}: {' '.join(cmd[1:])} (at most {limit:.0f} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.terminate()          # the part removes what it made on SIGTERM
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"=== {name}: stopped after {limit:.0f} s", flush=True)
    except BaseException:
        proc.terminate()
        proc.wait(120)
        raise
    print(f"=== {name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated parts of: {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: do the parts work?")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s): {', '.join(unknown)}")
    env = dict(os.environ)
    if a.quick and "EDGE_BENCH_RESULTS" not in env:
        env["EDGE_BENCH_RESULTS"] = tempfile.mkstemp(prefix="edge-bench-quick-", suffix=".md")[1]
        print(f"quick run: results in {env['EDGE_BENCH_RESULTS']}")
    failed = [p for p in parts if run_part(p, a.quick, env) != 0]
    if failed:
        print(f"parts that did not finish cleanly: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
