"""The whole agent against the real loopback lake: the LSST-style sustained ingest (not part of pytest).

    .venv/bin/python benchmarks/agent_lake.py [--files 16] [--size-mb 128] [--workers 4]

Starts (or reuses, EDGE_LAKE_ENV=.../lake.env) the lake of scripts/lake, runs `edge-agent run` as a
process with a push rule (HTTP upload to the first lake RSE, verified by Want-Digest, registered,
a rule for 1 copy, confirmed with the storage's adler32), writes N files the way a DAQ does
(write + rename), and times from the first file written to the last one deleted. For the same
files it also times `curl -T` one after the other and the agent's own HttpTransport alone.
Appends a dated section to benchmarks/RESULTS.md. LSST's target is 20 TB/24 h = 231 MB/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from lake import start_lake
from common import empty
from local import machine
from support import free_port, write_toml


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    gen = start_lake()
    lake = next(gen)
    rows = []
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            base = Path(tmp)
            buf, src = base / "buffer", base / "src"
            buf.mkdir()
            src.mkdir()
            block = os.urandom(1 << 20)
            for i in range(a.files):     # the DAQ's files, prepared beforehand so writing them is cheap
                with open(src / f"f{i:03d}.fits", "wb") as fh:
                    fh.writelines(block[k % 7:] + block[:k % 7] for k in range(a.size_mb))
            total = a.files * a.size_mb * (1 << 20)
            u = "b" + uuid.uuid4().hex[:8]
            port = free_port()
            doc = {"state_dir": str(base / "state"), "transfer_workers": a.workers, "hash_workers": 2,
                   "tick_seconds": 0.2, "confirm_interval_seconds": 1,
                   "status": {"port": port}, "log": {"level": "warning", "format": "json"},
                   "lake": lake.agent_lake_config(),
                   "destinations": {"lake1": {"kind": "rse", "rse": lake.lake_rses[0], "scheme": "http"}},
                   "rules": {"lsst": {"directory": str(buf), "scope": lake.scope, "completion": ["renamed"],
                                      "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.ds",
                                      "destinations": ["lake1"], "copies": 1}}}
            cfg = write_toml(base / "agent.toml", doc)
            with open(base / "agent.log", "wb") as log:
                agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "-c", str(cfg), "run"],
                                         stdout=log, stderr=subprocess.STDOUT)
            try:
                for _ in range(100):
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                        break
                    except OSError:
                        time.sleep(0.2)
                t0 = time.perf_counter()
                for f in sorted(src.iterdir()):
                    os.link(f, buf / (f.name + ".part"))      # the bytes are there at once, as after a write
                    os.rename(buf / (f.name + ".part"), buf / f.name)
                while not empty(buf):
                    time.sleep(0.1)
                t = time.perf_counter() - t0
            finally:
                agent.terminate()
                agent.wait(60)

            rows.append(((f"edge-agent end to end: {a.files} x {a.size_mb} MiB, hash + HTTP PUT + Want-Digest + "
                          f"Rucio register/rule/confirm + delete, {a.workers} transfer workers"),
                         f"{total / t / 1e6:,.0f} MB/s ({a.files / t:.2f} files/s)"))

            # reference: curl -T, one file after another, to the same storage
            t0 = time.perf_counter()
            for f in sorted(src.iterdir()):
                url = f"{lake.http_url}/data/lake1/bench-{u}/{f.name}"
                subprocess.run(["curl", "-sf", "-o", "/dev/null", "-T", str(f), url], check=True)
            t = time.perf_counter() - t0
            rows.append(("curl -T, same files, sequential (no hashing, no catalogue)",
                         f"{total / t / 1e6:,.0f} MB/s"))
    finally:
        try:
            next(gen)
        except StopIteration:
            pass
    text = [f"\n## benchmarks/agent_lake.py, {dt.date.today()} ({machine()})", "",
            (f"Agent, XRootD 5.5.3 (HTTP) and Rucio 41.5.1 ({lake.server()}) on the same 2 cores; files in page "
             "cache."), "",
            "| what | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    print("\n".join(text))
    with open(HERE / "RESULTS.md", "a") as fh:
        fh.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
