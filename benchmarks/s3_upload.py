"""Uploads to the S3 RSE (Ceph radosgw 16.2 over TLS, URLs signed by Rucio), side by side (not part of pytest).

    .venv/bin/python benchmarks/s3_upload.py [--files 6] [--size-mb 64]

Starts (or reuses, EDGE_LAKE_ENV=.../lake.env) the lake and its S3 store (scripts/lake/s3-start.sh).
For the same files, one after the other:
  curl -T        to write URLs Rucio signed beforehand (no hashing, no verification)
  S3Transport    per file: signed read (is it there?), signed PUT hashing blake3+adler32+md5 in the
                 pass, signed ranged read to check size + ETag; signing included
  edge-agent     end to end: hash, register, upload, verify, rule, confirm (ETag), delete; 1 copy on S3
Objects are deleted after each round so the OSD does not fill. Appends a section to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from pathlib import Path

import blake3

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from lake import start_lake, start_s3
from common import empty
from local import machine
from support import free_port, write_toml

from edge_agent.lake.rucio_client import RucioClient
from edge_agent.settings import RucioSettings
from edge_agent.transfer.base import Expected
from edge_agent.transfer.s3 import S3Transport


def expected(path: Path) -> Expected:
    h, a, m, n = blake3.blake3(), 1, hashlib.md5(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
            a = zlib.adler32(chunk, a)
            m.update(chunk)
            n += len(chunk)
    return Expected(n, h.hexdigest(), f"{a & 0xFFFFFFFF:08x}", m.hexdigest())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--size-mb", type=int, default=64)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    lakes = start_lake()
    lake = next(lakes)
    s3s = start_s3(lake)
    s3 = next(s3s)
    rows = []
    client = RucioClient(RucioSettings(**lake.agent_lake_config()["rucio"]))
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            base = Path(tmp)
            src, buf = base / "src", base / "buffer"
            src.mkdir()
            buf.mkdir()
            block = os.urandom(1 << 20)
            for i in range(a.files):
                with open(src / f"f{i:03d}.fits", "wb") as fh:
                    fh.writelines(block[k % 7:] + block[:k % 7] for k in range(a.size_mb))
            files = sorted(src.iterdir())
            total = a.files * a.size_mb * (1 << 20)
            u = "b" + uuid.uuid4().hex[:8]

            def sign(op: str, url: str) -> str:
                return client.signed_url(s3.rse, op, url, 600)

            def clean(pfns: list[str]) -> None:
                with S3Transport(sign, verify=s3.ca) as t:
                    for p in pfns:
                        t.delete(p)

            # curl -T to pre-signed URLs
            pfns = [s3.pfn(lake.scope, f"{u}.curl.{f.name}") for f in files]
            signed = [sign("write", p) for p in pfns]
            t0 = time.perf_counter()
            for f, url in zip(files, signed):
                subprocess.run(["curl", "-sf", "--cacert", s3.ca, "-o", "/dev/null", "-T", str(f), url], check=True)
            t = time.perf_counter() - t0
            rows.append((f"curl -T, {a.files} x {a.size_mb} MiB, sequential, URLs signed beforehand "
                         "(no hashing, no check)", f"{total / t / 1e6:,.0f} MB/s ({t:.1f} s)"))
            clean(pfns)

            # the agent's transport alone
            exp = {f: expected(f) for f in files}
            pfns = [s3.pfn(lake.scope, f"{u}.t.{f.name}") for f in files]
            with S3Transport(sign, verify=s3.ca) as tr:
                t0 = time.perf_counter()
                for f, p in zip(files, pfns):
                    tr.put(str(f), p, exp[f], lambda n: None)
                t = time.perf_counter() - t0
            rows.append(("S3Transport.put, same files, sequential: 3 signed URLs from Rucio, PUT hashing "
                         "blake3+adler32+md5 in the pass, ranged GET for size + ETag",
                         f"{total / t / 1e6:,.0f} MB/s ({t:.1f} s)"))
            clean(pfns)

            # the whole agent, 1 copy on S3
            port = free_port()
            doc = {"state_dir": str(base / "state"), "transfer_workers": 2, "hash_workers": 2,
                   "tick_seconds": 0.2, "confirm_interval_seconds": 1,
                   "status": {"port": port}, "log": {"level": "warning", "format": "json"},
                   "lake": lake.agent_lake_config(), "destinations": {"s3": s3.destination()},
                   "rules": {"s3": {"directory": str(buf), "scope": lake.scope, "completion": ["renamed"],
                                    "name_template": f"{u}.a.{{filename}}", "dataset_template": f"{u}.ds",
                                    "destinations": ["s3"], "copies": 1, "md5": True}}}
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
                for f in files:
                    os.link(f, buf / (f.name + ".part"))
                    os.rename(buf / (f.name + ".part"), buf / f.name)
                while not empty(buf):
                    time.sleep(0.1)
                t = time.perf_counter() - t0
            finally:
                agent.terminate()
                agent.wait(60)
            rows.append(("edge-agent end to end, same files, 2 transfer workers: hash, register, signed PUT, "
                         "ETag check, rule, confirm (signed read), delete", f"{total / t / 1e6:,.0f} MB/s ({t:.1f} s)"))
            clean([s3.pfn(lake.scope, f"{u}.a.{f.name}") for f in files])
    finally:
        client.close()
        for g in (s3s, lakes):
            try:
                next(g)
            except StopIteration:
                pass
    text = [f"\n## S3\n\nbenchmarks/s3_upload.py, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC ({machine()})",
            "",
            "Ceph radosgw 16.2.15 (1 mon, 1 bluestore OSD on a sparse file, beast TLS, self-signed CA verified), "
            "Rucio 41.5.1 signing every URL, agent and curl on the same 2 cores; files in page cache. "
            f"Other work was running on the machine (load average {load:.1f} at the start): figures are "
            "indicative, compare the rows with each other.", "",
            "| what | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    print("\n".join(text))
    with open(HERE / "RESULTS.md", "a") as fh:
        fh.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
