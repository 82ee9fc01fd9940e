"""Throughput of the parts the embedded default uses, on this machine (not part of pytest).

    .venv/bin/python benchmarks/local.py [--size-mb 1024] [--files 500]

Measures, from page cache: one-pass hashing (blake3+adler32, +md5), a copy through
PosixTransport (hash in the same pass, fsync, rename) against `cp` + `sync`, and the whole
agent end to end on the local lake (files/s and MB/s from the first file seen to the last
deleted). Appends a dated section with the machine to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import empty  # noqa: E402
from edge_agent.hashing import hash_file  # noqa: E402
from edge_agent.transfer.base import Expected  # noqa: E402
from edge_agent.transfer.posix import PosixTransport  # noqa: E402


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}, Python {platform.python_version()}"


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=500)
    a = ap.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        big = Path(tmp) / "big.bin"
        with open(big, "wb") as fh:
            block = os.urandom(1 << 20)
            for _ in range(a.size_mb):
                fh.write(block)
        size = big.stat().st_size
        big.read_bytes()  # page cache
        mb = size / 1e6
        for label, md5 in (("hash blake3+adler32 (one pass)", False), ("hash blake3+adler32+md5", True)):
            t = min(timed(lambda: hash_file(big, md5=md5)) for _ in range(2))
            rows.append((label, f"{mb / t:,.0f} MB/s"))
        t = min(timed(lambda: zlib.adler32(big.read_bytes())) for _ in range(1))
        rows.append(("read + zlib.adler32 alone (reference)", f"{mb / t:,.0f} MB/s"))
        d = hash_file(big)
        exp = Expected(d.size, d.blake3, d.adler32)
        dst = Path(tmp) / "lake" / "copy.bin"
        tr = PosixTransport(fsync=True)

        def copy() -> None:
            if dst.exists():
                dst.unlink()
            tr.put(str(big), str(dst), exp, lambda n: None)
        t = min(timed(copy) for _ in range(2))
        rows.append(("PosixTransport.put (hash in pass, fsync, rename)", f"{mb / t:,.0f} MB/s"))

        def cp() -> None:
            subprocess.run(["cp", str(big), str(dst) + ".cp"], check=True)
            subprocess.run(["sync", str(dst) + ".cp"], check=True)
        t = min(timed(cp) for _ in range(2))
        rows.append(("cp + sync (reference, no hashing)", f"{mb / t:,.0f} MB/s"))
        big.unlink()
        shutil.rmtree(Path(tmp) / "lake")

        # the whole agent: N small files through the local lake, two copies each
        from edge_agent import logs
        from edge_agent.app import Agent
        from edge_agent.settings import load_settings
        root = Path(tmp) / "e2e"
        for p in ("buf", "l1", "l2"):
            (root / p).mkdir(parents=True)
        cfg = root / "c.toml"
        cfg.write_text(f"""state_dir = "{root}/state"\ntick_seconds = 0.1\n[status]\nenabled = false
[destinations.l1]\npath = "{root}/l1"\n[destinations.l2]\npath = "{root}/l2"
[rules.daq]\ndirectory = "{root}/buf"\nscope = "bench"\ndestinations = ["l1", "l2"]\ncompletion = ["renamed"]\n""")
        logs.setup("warning", "json", stream=open(os.devnull, "w"))
        agent = Agent(load_settings(cfg))
        th = threading.Thread(target=agent.run, daemon=True)
        th.start()
        payloads = [os.urandom(64 * 1024) for _ in range(a.files)]   # each file its own bytes
        t0 = time.perf_counter()
        for i in range(a.files):
            tmpf = root / "buf" / f"f{i:05d}.fits.part"
            tmpf.write_bytes(payloads[i])
            os.rename(tmpf, root / "buf" / f"f{i:05d}.fits")
        while not empty(root / "buf"):
            time.sleep(0.05)
        t = time.perf_counter() - t0
        agent.stop()
        th.join(30)
        rows.append((f"agent end to end, {a.files} x 64 KiB, 2 copies, local lake",
                     f"{a.files / t:,.0f} files/s ({a.files * 64 * 1024 / t / 1e6:,.1f} MB/s)"))
    text = [f"\n## benchmarks/local.py, {dt.date.today()} ({machine()})", "",
            f"{a.size_mb} MiB file in page cache for the first rows.", "", "| what | result |", "|---|---|"]
    text += [f"| {k} | {v} |" for k, v in rows]
    print("\n".join(text))
    with open(HERE / "RESULTS.md", "a") as fh:
        fh.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
