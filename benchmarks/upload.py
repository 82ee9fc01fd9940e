"""Upload throughput against the loopback XRootD of the test lake: the agent's transports next
to the usual command-line clients. Not part of pytest; see benchmarks/README.md.

    .venv/bin/python benchmarks/upload.py [--big-mib 2048] [--small 500] [--small-kib 64]

Appends a dated section to benchmarks/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.hashing import hash_file
from edge_agent.transfer.base import Expected
from edge_agent.transfer.http import HttpTransport
from edge_agent.transfer.xroot import XRootTransport, bindings_available

HERE = Path(__file__).resolve().parent
MB = 1e6
sys.path.insert(0, str(HERE.parent / "tests"))
from lake import read_env  # noqa: E402 - the tests' reader of scripts/lake's lake.env


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    xrootd = subprocess.run(["xrdcp", "--version"], capture_output=True, text=True, check=False)
    return (f"nproc {os.cpu_count()}, CPU {cpu}, kernel {platform.release()}, Python "
            f"{platform.python_version()}, xrdcp {(xrootd.stdout or xrootd.stderr).strip()}")


def make_file(path: Path, size: int) -> None:
    # random blocks (incompressible); one 64 MiB block reused with a changing head keeps it fast
    block = bytearray(os.urandom(min(size, 64 << 20)))
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            block[:8] = i.to_bytes(8, "little")
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            i += 1


def expected(path: Path, md5: bool = False) -> Expected:
    d = hash_file(path, md5=md5)
    return Expected(d.size, d.blake3, d.adler32, d.md5)


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[:300]}")


class Bench:
    def __init__(self, env: dict[str, str], work: Path, budget: float) -> None:
        self.http_base = env["EDGE_LAKE_XROOTD_HTTP_URL"]
        self.root_base = env["EDGE_LAKE_XROOTD_ROOT_URL"]
        self.data_dir = Path(env["EDGE_LAKE_DATA_DIR"])
        for u in (self.http_base, self.root_base):
            if urlsplit(u).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit(f"loopback only: {u}")
        self.rel = f"data/lake1/edge-bench/{uuid.uuid4().hex[:10]}"
        self.work = work
        self.budget = budget       # seconds a one-process-per-file client may take for the small files
        self.rows: list[tuple[str, str, str, str]] = []

    def http(self, name: str) -> str:
        return f"{self.http_base}/{self.rel}/{name}"

    def root(self, name: str) -> str:
        return f"{self.root_base}//{self.rel}/{name}"

    def clean(self) -> None:
        shutil.rmtree(self.data_dir / self.rel, ignore_errors=True)

    def add(self, what: str, method: str, value: str, note: str = "") -> None:
        self.rows.append((what, method, value, note))
        print(f"  {what:<22} {method:<44} {value:>14}  {note}", flush=True)

    # ------------------------------------------------------------ one big file
    def big(self, src: Path, methods: dict[str, Callable[[str], None]],
            checksum: Callable[[str, str], object]) -> None:
        """Each method uploads src once; the clients that do not verify are followed by the
        checksum query the agent would make (timed apart, on the file the server just got)."""
        size = src.stat().st_size
        for name, fn in methods.items():
            self.clean()
            os.sync()      # no writeback of the previous run's 2 GiB in this one's time
            t0 = time.perf_counter()
            try:
                fn(f"big-{name.split()[0]}")
            except Exception as exc:  # noqa: BLE001 - a client that fails is reported, not fatal
                self.add(f"{size / 2**30:.1f} GiB file", name, "failed", str(exc)[:120])
                continue
            took = time.perf_counter() - t0
            note = f"{took:.1f} s"
            if "no hashing" in name:
                t1 = time.perf_counter()
                checksum(name, f"big-{name.split()[0]}")
                note += f"; then the server's checksum: {time.perf_counter() - t1:.1f} s"
            self.add(f"{size / 2**30:.1f} GiB file", name, f"{size / MB / took:,.0f} MB/s", note)
        self.clean()

    # ------------------------------------------------------------ many small files
    def small(self, files: list[Path], methods: dict[str, Callable[[list[Path], float], int]]) -> None:
        kib = files[0].stat().st_size // 1024
        for name, fn in methods.items():
            self.clean()
            t0 = time.perf_counter()
            try:
                done = fn(files, t0 + self.budget)
            except Exception as exc:  # noqa: BLE001
                self.add(f"{len(files)} x {kib} KiB", name, "failed", str(exc)[:120])
                continue
            took = time.perf_counter() - t0
            note = f"{done} files in {took:.1f} s" + ("" if done == len(files) else " (time budget reached)")
            self.add(f"{len(files)} x {kib} KiB", name, f"{done / took:,.0f} files/s", note)
        self.clean()


def per_file(upload: Callable[[Path, str], None]) -> Callable[[list[Path], float], int]:
    def go(files: list[Path], deadline: float) -> int:
        n = 0
        for f in files:
            upload(f, f.name)
            n += 1
            if time.perf_counter() > deadline:
                break
        return n
    return go


def pooled(upload: Callable[[Path, str], None], threads: int) -> Callable[[list[Path], float], int]:
    def go(files: list[Path], deadline: float) -> int:
        with cf.ThreadPoolExecutor(threads) as pool:
            for fut in [pool.submit(upload, f, f.name) for f in files]:
                fut.result()
        return len(files)
    return go


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default=os.environ.get("EDGE_LAKE_ENV", "/var/tmp/edge-lake-tests/lake.env"),
                    help="lake.env of a running test lake (scripts/lake/start.sh)")
    ap.add_argument("--big-mib", type=int, default=2048)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--small-kib", type=int, default=64)
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds a one-process-per-file client may spend on the small files")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()

    # killed by `timeout` or ^C: still remove the files from the lake and /var/tmp (finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = read_env(Path(args.env))
    tools = {t: shutil.which(t) for t in ("curl", "xrdcp", "davix-put")}
    work = Path(tempfile.mkdtemp(prefix="edge-bench-", dir="/var/tmp"))
    b = Bench(env, work, args.budget)
    started = dt.datetime.now().astimezone()
    print(f"machine: {machine()}\nwork: {work}", flush=True)
    http = HttpTransport(timeout=120)
    http4 = HttpTransport(timeout=120, max_connections=4)
    xroot = XRootTransport(backend="cli", timeout=120)
    xroot_py = XRootTransport(backend="python", timeout=120) if bindings_available() else None
    try:
        # ---------------------------------------------------------------- big
        big = work / "big.bin"
        make_file(big, args.big_mib << 20)
        os.sync()
        e, e_md5 = expected(big), expected(big, md5=True)   # what the agent recorded at its hash step

        def put_with(t: HttpTransport | XRootTransport, url: Callable[[str], str],
                     ex: Expected) -> Callable[[str], None]:
            def up(n: str) -> None:
                t.put(str(big), url(n), ex, _no_pace)
            return up

        big_methods: dict[str, Callable[[str], None]] = {
            "HttpTransport (blake3+adler32, verified)": put_with(http, b.http, e),
            "HttpTransport +md5 (verified)": put_with(http, b.http, e_md5),
            "XRootTransport cli (xrdcp stdin, verified)": put_with(xroot, b.root, e),
        }
        if xroot_py is not None:
            big_methods["XRootTransport python (verified)"] = put_with(xroot_py, b.root, e)
        if tools["curl"]:
            big_methods["curl -T (HTTP, no hashing)"] = lambda n: run(
                ["curl", "-sS", "-f", "-T", str(big), "-o", "/dev/null", b.http(n)])
        if tools["xrdcp"]:
            big_methods["xrdcp (root://, no hashing)"] = lambda n: run(["xrdcp", "-s", "-f", str(big), b.root(n)])
        if tools["davix-put"]:
            big_methods["davix-put (HTTP, no hashing)"] = lambda n: run(["davix-put", str(big), b.http(n)])
        print(f"\n{args.big_mib} MiB file:", flush=True)
        b.big(big, big_methods, lambda name, n: (xroot.stat(b.root(n)) if "root://" in name
                                                 else http.stat(b.http(n))))
        big.unlink()

        # ---------------------------------------------------------------- small
        sdir = work / "small"
        sdir.mkdir()
        files = []
        for i in range(args.small):
            p = sdir / f"s{i:05d}.dat"
            p.write_bytes(os.urandom(args.small_kib * 1024))
            files.append(p)
        exp = {p.name: expected(p) for p in files}
        exp_md5 = {p.name: expected(p, md5=True) for p in files}

        def via(t: HttpTransport | XRootTransport, url: Callable[[str], str],
                ex: dict[str, Expected]) -> Callable[[Path, str], None]:
            def up(f: Path, n: str) -> None:
                t.put(str(f), url(n), ex[n], _no_pace)
            return up

        small_methods: dict[str, Callable[[list[Path], float], int]] = {
            "HttpTransport, 1 thread (verified)": per_file(via(http, b.http, exp)),
            "HttpTransport +md5, 1 thread (verified)": per_file(via(http, b.http, exp_md5)),
            "HttpTransport, 4 threads (verified)": pooled(via(http4, b.http, exp), 4),
            "XRootTransport cli, 1 thread (verified)": per_file(via(xroot, b.root, exp)),
        }
        if xroot_py is not None:
            small_methods["XRootTransport python, 1 thread (verified)"] = per_file(via(xroot_py, b.root, exp))
            small_methods["XRootTransport python, 4 threads (verified)"] = pooled(via(xroot_py, b.root, exp), 4)
        if tools["curl"]:
            small_methods["curl -T, one process per file"] = per_file(lambda f, n: run(
                ["curl", "-sS", "-f", "-T", str(f), "-o", "/dev/null", b.http(n)]))
        if tools["xrdcp"]:
            small_methods["xrdcp, one process per file"] = per_file(lambda f, n: run(
                ["xrdcp", "-s", "-f", str(f), b.root(n)]))

            def xrdcp_parallel(fs: list[Path], deadline: float) -> int:
                run(["xrdfs", b.root_base, "mkdir", "-p", f"/{b.rel}/batch"])
                run(["xrdcp", "-s", "-f", "-r", "--parallel", "4", str(sdir) + "/", b.root("batch/")])
                return len(fs)
            small_methods["xrdcp -r --parallel 4, one process"] = xrdcp_parallel
        if tools["davix-put"]:
            small_methods["davix-put, one process per file"] = per_file(lambda f, n: run(
                ["davix-put", str(f), b.http(n)]))
        print(f"\n{args.small} x {args.small_kib} KiB files:", flush=True)
        b.small(files, small_methods)
    finally:
        http.close()
        http4.close()
        b.clean()
        shutil.rmtree(work, ignore_errors=True)

    took = (dt.datetime.now().astimezone() - started).total_seconds()
    section = [f"\n## {started:%Y-%m-%d %H:%M %Z}\n",
               f"Machine: {machine()}.  ",
               (f"Server: XRootD on loopback ({b.http_base}, {b.root_base}), client and server on the same "
                f"cores. Source files in the page cache. Run took {took:.0f} s.\n"),
               "| what | method | result | detail |", "|---|---|---:|---|"]
    section += [f"| {w} | {m} | {v} | {n} |" for w, m, v, n in b.rows]
    missing = [t for t, p in tools.items() if not p]
    if missing:
        section.append(f"\nNot installed, not measured: {', '.join(missing)}.")
    text = "\n".join(section) + "\n"
    res = Path(args.results)
    if not res.exists():
        res.write_text("# Upload benchmark results\n\nAppended by `benchmarks/upload.py`; see README.md.\n")
    with open(res, "a") as f:
        f.write(text)
    print(text)
    return 0


def _no_pace(n: int) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
