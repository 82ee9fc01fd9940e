"""Several agents on one buffer (issue 15): files per second of 1, then 2, then 3 agents, in one run.

    EDGE_LAKE_ENV=/var/tmp/edge-lake-dev/lake.env .venv/bin/python benchmarks/fleet.py \\
        [--files 240] [--size-mib 8] [--host-mbps 16] [--agents 1,2,3]

Targets: 2 agents move >= 1.6 x and 3 agents >= 2.2 x the files per second of one, with transfers
capped per agent so that the host is not the bound.

Each phase is a fleet of its own, as tests/faults/test_fleet.py builds one: N agent processes
(`edge-agent run`, each with its own state_dir and ledger.agent_id) on one buffer, one PostgreSQL
ledger (a fresh schema on the lake's PostgreSQL, the edge_ledger database of scripts/lake/start.sh,
dropped afterwards) and the local lake (one destination directory, one copy, `lake.catalog`
shared). Each agent's transfers are capped by `host_bandwidth_mbps`; there is no fleet cap
(`bandwidth_mbps` = 0), so N agents may send N caps.

The files (--files of --size-mib, incompressible, each its own bytes) are written once, up front,
outside the buffer. In each phase the agents start on the empty buffer and are healthy; then every
file is hard-linked into the buffer under a temporary name and renamed (the rename is its
completion: `renamed`). The clock runs from the first rename to the last file deleted from the
buffer (its copy confirmed by the catalogue). Also measured per phase: the agents' CPU time, the
whole machine's CPU use (PostgreSQL included) and the bytes each agent sent (its /metrics): what
bounds the figure. Appends a dated section to RESULTS.md; removes what it made, also when killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ROOT,
    Agent,
    MiB,
    data_files,
    empty,
    exit_on_sigterm,
    load,
    loopback_only,
    make_file,
    ratio,
    verdict,
    write_section,
)

sys.path.insert(0, str(ROOT / "tests"))
from lake import read_env

TARGETS = {2: 1.6, 3: 2.2}
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    agents: int
    files: int
    done: int = 0                 # files gone from the buffer within the budget
    seconds: float = 0.0
    deleted_in_ledger: int = 0    # rows in state `deleted` at the end
    agent_cpu_s: float = 0.0      # user + system time of the agent processes over the run
    machine_busy: float = 0.0     # fraction of all cores busy over the run (PostgreSQL included)
    sent_mb: list[float] = field(default_factory=list)   # per agent, its own counter
    load: str = ""

    @property
    def files_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


def cpu_s(pid: int) -> float:
    """User + system seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores so far."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]            # idle + iowait
    return sum(vals) - idle, sum(vals)


class Schemas:
    """Fresh schemas on the lake's ledger database, each dropped by drop_all (tests/pgledger.py)."""

    def __init__(self, url: str, password: str) -> None:
        self.url, self.password = url, password
        self.made: list[str] = []

    def new(self) -> str:
        """A URL whose search_path is a new, empty schema."""
        import psycopg
        schema = "bench_fleet_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.url, password=self.password, autocommit=True) as db:
            db.execute(f"CREATE SCHEMA {schema}")
        self.made.append(schema)
        return f"{self.url}?options={urllib.parse.quote(f'-csearch_path={schema}')}"

    def deleted(self, url: str) -> int:
        import psycopg
        with psycopg.connect(url, password=self.password) as db:
            return int(db.execute("SELECT COUNT(*) FROM files WHERE state = 'deleted'").fetchone()[0])  # type: ignore[index]

    def drop_all(self) -> None:
        import psycopg
        with psycopg.connect(self.url, password=self.password, autocommit=True) as db:
            while self.made:
                db.execute(f"DROP SCHEMA IF EXISTS {self.made.pop()} CASCADE")


def run_phase(n: int, staged: list[Path], work: Path, schemas: Schemas, secret: Path, a: argparse.Namespace) -> Phase:
    base = work / f"fleet{n}"
    buffer, lake_dir = base / "buffer" / "daq", base / "lake" / "l1"
    buffer.mkdir(parents=True)
    lake_dir.mkdir(parents=True)
    url = schemas.new()
    agents: list[Agent] = []
    ph = Phase(n, len(staged), load=load())
    try:
        for i in range(n):
            home = base / f"agent{i}"
            home.mkdir()
            agents.append(Agent(home, {
                "state_dir": str(home / "state"), "tick_seconds": 0.2, "confirm_interval_seconds": 1,
                "rescan_seconds": 30, "hash_workers": a.hash_workers, "transfer_workers": 2,
                "host_bandwidth_mbps": a.host_mbps,
                "ledger": {"url": url, "password_file": str(secret), "agent_id": f"bench{i}",
                           "lease_seconds": a.lease},
                "lake": {"catalog": str(base / "catalog.sqlite")},
                "destinations": {"l1": {"path": str(lake_dir)}},
                "rules": {"daq": {"directory": str(buffer), "scope": "bench", "destinations": ["l1"],
                                  "copies": 1, "completion": ["renamed"]}}}))
        for ag in agents:
            ag.start()
        for ag in agents:
            ag.wait_healthy()
        time.sleep(2.0)     # the start-up work (first rescan, heartbeats) done before counting
        sent0 = [ag.metrics().get("edge_agent_sent_bytes", 0.0) for ag in agents]
        for f in staged:
            os.link(f, buffer / f".{f.name}.part")     # the bytes are there at once, as after a write
        cpu0, (busy0, total0) = [cpu_s(ag.pid) for ag in agents], machine_cpu()
        t0 = time.perf_counter()
        for f in staged:
            os.rename(buffer / f".{f.name}.part", buffer / f.name)

        def alive() -> None:
            for ag in agents:
                ag.alive()
        while not empty(buffer) and time.perf_counter() - t0 < a.budget:
            alive()
            time.sleep(0.05)
        ph.seconds = time.perf_counter() - t0
        busy1, total1 = machine_cpu()
        ph.agent_cpu_s = sum(cpu_s(ag.pid) for ag in agents) - sum(cpu0)
        ph.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
        ph.sent_mb = [(ag.metrics().get("edge_agent_sent_bytes", 0.0) - s) / 1e6 for ag, s in zip(agents, sent0)]
        left = {p.name for p in data_files(buffer)}
        ph.done = sum(1 for f in staged if f.name not in left)
        if ph.done < len(staged):
            keep = Path("/var/tmp/edge-bench-logs")
            keep.mkdir(exist_ok=True)
            for i, ag in enumerate(agents):
                shutil.copy(ag.log, keep / f"fleet{n}-agent{i}-{uuid.uuid4().hex[:6]}.log")
            print(f"{len(staged) - ph.done} files not done in {a.budget:.0f} s; agents' logs kept in {keep}",
                  flush=True)
    finally:
        for ag in agents:
            ag.stop()
    ph.deleted_in_ledger = schemas.deleted(url)
    shutil.rmtree(base, ignore_errors=True)
    print(f"{n} agent(s): {ph.done}/{ph.files} files in {ph.seconds:.1f} s = {ph.files_s:.2f} files/s; "
          f"sent MB per agent {[round(x) for x in ph.sent_mb]}; agents' CPU {ph.agent_cpu_s:.1f} s; "
          f"machine {100 * ph.machine_busy:.0f} % busy", flush=True)
    return ph


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=240)
    ap.add_argument("--size-mib", type=float, default=8)
    ap.add_argument("--host-mbps", type=float, default=16, help="each agent's host_bandwidth_mbps")
    ap.add_argument("--agents", default="1,2,3", help="the fleet sizes, in order (ratios are to the first)")
    ap.add_argument("--hash-workers", type=int, default=1)
    ap.add_argument("--lease", type=float, default=30, help="ledger.lease_seconds")
    ap.add_argument("--budget", type=float, default=900, help="seconds a phase may take")
    a = ap.parse_args(argv)
    exit_on_sigterm()
    given = os.environ.get("EDGE_LAKE_ENV")
    if not given:
        raise SystemExit("EDGE_LAKE_ENV=/path/lake.env: the lake's PostgreSQL holds the shared ledger")
    env = read_env(Path(given))
    if not env.get("EDGE_LAKE_LEDGER_URL"):
        raise SystemExit(f"{given}: no EDGE_LAKE_LEDGER_URL (a lake started with EDGE_LAKE_RUCIO_DB=sqlite "
                         "has no PostgreSQL)")
    url, password = env["EDGE_LAKE_LEDGER_URL"], env["EDGE_LAKE_LEDGER_PASSWORD"]
    loopback_only(url)
    sizes = [int(x) for x in a.agents.split(",") if x.strip()]
    start_load = load()
    size = int(a.size_mib * MiB)
    work = Path(tempfile.mkdtemp(prefix="edge-bench-fleet-", dir="/var/tmp"))
    schemas = Schemas(url, password)
    phases: list[Phase] = []
    try:
        secret = work / "ledger.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        staging = work / "staging"
        staging.mkdir()
        staged = [staging / f"f{i:05d}.fits" for i in range(a.files)]
        for i, f in enumerate(staged):
            make_file(f, size, seed=i)
        for n in sizes:
            phases.append(run_phase(n, staged, work, schemas, secret, a))
    finally:
        try:
            schemas.drop_all()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    one = phases[0] if phases and phases[0].agents == 1 else None
    cap_files_s = a.host_mbps * 1e6 / size      # what one agent's cap allows
    rows: list[tuple[Any, ...]] = []
    for ph in phases:
        r = ph.files_s / one.files_s if one and one.files_s and ph is not one else None
        target = TARGETS.get(ph.agents)
        all_done = ph.done == ph.files and ph.deleted_in_ledger == ph.files
        rows.append((
            ph.agents, f"{ph.done}/{ph.files}" + ("" if all_done else f" (ledger: {ph.deleted_in_ledger} deleted)"),
            f"{ph.seconds:.1f} s", f"{ph.files_s:.2f}", f"{ph.files_s * size / 1e6:.1f}",
            f"{ph.files_s / (ph.agents * cap_files_s):.2f}",
            "1" if ph is one else ratio(ph.files_s, one.files_s if one else None),
            f">= {target}" if target else "", verdict(None if r is None or target is None else (r >= target and all_done)),
            " / ".join(f"{x:.0f}" for x in ph.sent_mb), f"{ph.agent_cpu_s / max(1, ph.done) * 1000:.0f} ms",
            f"{100 * ph.machine_busy:.0f} %", ph.load))
    write_section("benchmarks/fleet.py", [
        (f"Load average at the start: {start_load}. {a.files} files of {a.size_mib:g} MiB written up front, then "
        f"renamed into one buffer shared by N agent processes (PostgreSQL ledger on loopback, a fresh schema per "
        f"fleet; local lake, one copy, shared catalogue; hash_workers {a.hash_workers}, lease {a.lease:g} s). Each "
        f"agent capped by host_bandwidth_mbps = {a.host_mbps:g} ({cap_files_s:.2f} files/s per agent at most); "
        f"no fleet cap. Files/s from the first rename to the last deletion. `of the caps`: files/s over N x "
        f"what one cap allows. Machine CPU: all {os.cpu_count()} cores, PostgreSQL included.")],
        ("agents", "files", "time", "files/s", "MB/s", "of the caps", "x one agent", "target", "",
         "MB sent per agent", "agents' CPU per file", "machine CPU busy", "load at start"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
