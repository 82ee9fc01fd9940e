"""Large files end to end, side by side with the bare clients (issue 5).

    EDGE_LAKE_ENV=/var/tmp/edge-lake-dev/lake.env .venv/bin/python benchmarks/large.py [--files 4] [--size-mib 1024]

The same N files (page cache), in one run:
  edge-agent           end to end: hash (blake3+adler32), register, HTTP PUT, Want-Digest check,
                       replica + rule, confirm, delete; 4 transfer workers; also with md5
  curl -T, xrdcp, davix-put   one file after the other to the same XRootD; no hashing, no check
Targets: agent >= 1.0 x the faster of curl and xrdcp, >= 0.7 x davix-put; with md5 >= 231 MB/s.
The agent runs also give the read-once figure (benchmarks/read_once.py). Appends to RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MiB, exit_on_sigterm, load, loopback_only, make_file, ratio, rucio_version  # noqa: E402
from common import verdict, write_section  # noqa: E402
from lake_agent import agent_e2e  # noqa: E402
from read_once import HEADER as READ_HEADER  # noqa: E402
from read_once import read_rows  # noqa: E402


def clients(lake: Any, rel: str) -> dict[str, Callable[[Path], list[str]]]:
    http = f"{lake.http_url}/{rel}"
    root = f"{lake.root_url}//{rel}"
    out: dict[str, Callable[[Path], list[str]]] = {
        "curl -T": lambda f: ["curl", "-sS", "-f", "-T", str(f), "-o", "/dev/null", f"{http}/curl/{f.name}"],
        "xrdcp": lambda f: ["xrdcp", "-s", "-f", str(f), f"{root}/xrdcp/{f.name}"],
        "davix-put": lambda f: ["davix-put", str(f), f"{http}/davix/{f.name}"],
    }
    return {k: v for k, v in out.items() if shutil.which(k.split()[0])}


def time_client(cmd: Callable[[Path], list[str]], files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        r = subprocess.run(cmd(f), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd(f)[0]} failed ({r.returncode}): {r.stderr.strip()[:300]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=300, help="seconds per agent run")
    a = ap.parse_args(argv)
    exit_on_sigterm()
    from lake import start_lake
    lakes = start_lake()
    lake = next(lakes)
    loopback_only(lake.url, lake.http_url, lake.root_url)
    start_load = load()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-large-", dir="/var/tmp"))
    rel = f"data/lake1/edge-bench/{uuid.uuid4().hex[:10]}"
    rows: list[tuple[Any, ...]] = []
    reads: list[tuple[Any, ...]] = []
    try:
        src = work / "src"
        src.mkdir()
        files = [src / f"L{i:02d}.fits" for i in range(a.files)]
        for i, f in enumerate(files):
            make_file(f, a.size_mib * MiB, seed=100 + i)
        total = a.files * a.size_mib * MiB
        ref: dict[str, float] = {}
        for name, cmd in clients(lake, rel).items():
            t = time_client(cmd, files)
            ref[name] = total / t / 1e6
            rows.append((f"{name}, sequential (no hashing, no check, no catalogue)", f"{ref[name]:,.0f} MB/s",
                         f"{t:.1f} s", "", "", ""))
            shutil.rmtree(lake.data_dir / rel, ignore_errors=True)
        fast = max((v for k, v in ref.items() if k in ("curl -T", "xrdcp")), default=None)
        davix = ref.get("davix-put")
        for md5 in (False, True):
            run = agent_e2e(lake, files, work, md5=md5, budget=a.budget)
            label = "edge-agent end to end" + (" +md5" if md5 else "") + f", 4 transfer workers ({run.done}/{run.files} done)"
            rate = run.mb_s if run.done else None
            if not md5:
                rows.append((label, f"{run.mb_s:,.0f} MB/s", f"{run.seconds:.1f} s",
                             f"{ratio(rate, fast)} x faster of curl/xrdcp; {ratio(rate, davix)} x davix-put",
                             ">= 1.0; >= 0.7",
                             f"{verdict(rate and fast and rate >= fast)}; "
                             f"{verdict(rate and davix and rate >= 0.7 * davix)}"))
            else:
                rows.append((label, f"{run.mb_s:,.0f} MB/s", f"{run.seconds:.1f} s",
                             f"{ratio(rate, fast)} x faster of curl/xrdcp", ">= 231 MB/s",
                             verdict(bool(rate and rate >= 231))))
            reads += read_rows(run, "md5" if md5 else "blake3+adler32")
    finally:
        shutil.rmtree(lake.data_dir / rel, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        next(lakes, None)
    write_section("benchmarks/large.py", [
        f"Load average at the start: {start_load}. Rucio {rucio_version(lake.url)}, XRootD on loopback "
        f"({lake.http_url}, {lake.root_url}); agent, clients and servers share the cores; {a.files} x "
        f"{a.size_mib} MiB in page cache."],
        ("what", "rate", "time", "ratio", "target", ""), rows)
    write_section("benchmarks/large.py: bytes read per byte uploaded, same agent runs", [], READ_HEADER, reads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
