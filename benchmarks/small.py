"""Many small files end to end, side by side with `xrdcp -r --parallel 4` and `rucio upload` (issue 5).

    EDGE_LAKE_ENV=/var/tmp/edge-lake-dev/lake.env .venv/bin/python benchmarks/small.py \
        [--files 20000] [--kib 64] [--budget 600] [--rucio-files 200] [--rucio-budget 300]

The same files (page cache), in one run:
  edge-agent        end to end, each file: hash, register (DID, dataset), HTTP PUT, Want-Digest check,
                    replica, rule, confirm in Rucio, delete; stopped at --budget, the rate is then
                    over the files done
  xrdcp -r --parallel 4   the whole directory in one process to the same XRootD (no catalogue)
  rucio upload      rucio-clients 41.5.1 (a venv of its own, --rucio-venv) on the first --rucio-files
                    files, one command, protocol root (the lake's RSE protocols: root impl xrootd,
                    http impl webdav, which `rucio upload` cannot use over plain http)
  rucio bulk ceiling   the server itself (issue 14): a bare client registers --ceiling-files of the
                    same files (no storage, no agent) by the minimal bulk calls, in batches of the
                    lake's bulk limit (1,000; 480 on SQLite): per batch a dataset, attach with replicas
                    (rse, bytes, adler32), one rule; then each rule's state until OK (benchmarks/ceiling.py)
Targets: >= 300 files/s, >= 0.5 x xrdcp, >= 20 x rucio upload (issue 5); >= 0.8 x the ceiling
(issue 14). Appends to RESULTS.md. --only-ceiling: the ceiling alone (a minute or so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import exit_on_sigterm, load, loopback_only, ratio, rucio_version, verdict  # noqa: E402
from common import write_section  # noqa: E402
from ceiling import Ceiling, facts_of, measure, random_facts  # noqa: E402
from lake_agent import agent_e2e, lake_file  # noqa: E402

RUCIO_VENV = Path(os.environ.get("EDGE_BENCH_RUCIO_VENV", "/var/tmp/bench-rucio-clients"))


def rucio_upload(lake: Any, files: list[Path], work: Path, venv: Path, budget: float) -> tuple[int, float, str]:
    """`rucio upload` of the files in one command, with a config of its own pointing at the lake.
    Returns (files uploaded, seconds, note)."""
    exe = venv / "bin" / "rucio"
    if not exe.exists():
        return 0, 0.0, (f"not measured: no {exe} (python3 -m venv {venv} && {venv}/bin/pip install "
                        "rucio-clients==41.5.1)")
    cfg = work / "rucio.cfg"
    cfg.write_text(f"[client]\nrucio_host = {lake.url}\nauth_host = {lake.url}\nauth_type = userpass\n"
                   f"username = {lake.env['EDGE_LAKE_RUCIO_USERNAME']}\n"
                   f"password = {lake.env['EDGE_LAKE_RUCIO_PASSWORD']}\naccount = {lake.account}\n")
    proxy = work / "x509-proxy"     # it insists on a proxy file existing, even for userpass
    proxy.touch()
    env = {**os.environ, "RUCIO_CONFIG": str(cfg), "X509_USER_PROXY": str(proxy)}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([str(exe), "upload", "--rse", lake.lake_rses[0], "--scope", lake.scope, "--protocol",
                            "root", *map(str, files)], env=env, capture_output=True, text=True, check=False,
                           timeout=budget, cwd=work)
        took = time.perf_counter() - t0
        done = r.stderr.count("Successfully uploaded file") + r.stdout.count("Successfully uploaded file")
        note = "" if r.returncode == 0 else f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-200:]}"
    except subprocess.TimeoutExpired as exc:
        took = time.perf_counter() - t0
        out = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        done = out.count("Successfully uploaded file")
        note = "time budget reached"
    return done, took, note


def ceiling(lake: Any, files: list[Path], a: argparse.Namespace) -> tuple[Ceiling, tuple[Any, ...]]:
    """The Rucio bulk ceiling on the first --ceiling-files of `files` (random ones beyond them)."""
    from edge_agent.lake.rucio_client import RucioClient
    from edge_agent.settings import RucioSettings

    facts = facts_of(files[:a.ceiling_files])
    facts += random_facts(a.ceiling_files - len(facts), a.kib * 1024, first=len(facts))
    client = RucioClient(RucioSettings.model_validate(
        {**lake.agent_lake_config()["rucio"], "timeout_seconds": 300}))
    try:
        c = measure(client, lake.scope, lake.lake_rses, facts, lake.env, copies=a.ceiling_copies,
                    batch=a.ceiling_batch, budget=a.budget)
    finally:
        client.close()
    rses = "|".join(lake.lake_rses[:a.ceiling_copies])
    row = (f"rucio bulk ceiling: bare client, no storage; per batch: dataset, attach with replicas on "
           f"{lake.lake_rses[0]}" + (", replicas on the other RSEs" if a.ceiling_copies > 1 else "")
           + f", one rule ({a.ceiling_copies} on {rses}); rule states until OK",
           f"{c.files_s:,.0f} files/s" if c.files_s else "n/a",
           f"{len(facts)} files in {c.seconds:.1f} s, {c.rules} batches of <= {c.batch} ({c.batch_why}), "
           f"{c.calls} calls", c.note, "", "")
    return c, row


def compare(lake: Any, a: argparse.Namespace, work: Path, rel: str, rows: list[tuple[Any, ...]],
            rucio_names: list[str]) -> None:
    """The agent end to end beside xrdcp, rucio upload and the Rucio bulk ceiling: their rows
    (the agent's first) go to `rows`, the DID names rucio upload used to `rucio_names`."""
    src = work / "src"
    src.mkdir()
    files = []
    for i in range(a.files):
        files.append(src / f"s{i:05d}.dat")
        files[-1].write_bytes(os.urandom(a.kib * 1024))

    # xrdcp -r --parallel 4: one process for the whole directory
    subprocess.run(["xrdfs", lake.root_url, "mkdir", "-p", f"/{rel}/x"], check=True, capture_output=True)
    t0 = time.perf_counter()
    subprocess.run(["xrdcp", "-s", "-f", "-r", "--parallel", "4", f"{src}/", f"{lake.root_url}//{rel}/x/"],
                   check=True, capture_output=True, timeout=1800)
    t_x = time.perf_counter() - t0
    xrdcp = a.files / t_x
    rows.append(("xrdcp -r --parallel 4, one process (no hashing, no check, no catalogue)",
                 f"{xrdcp:,.0f} files/s", f"{a.files} files in {t_x:.1f} s", "", "", ""))
    shutil.rmtree(lake.data_dir / rel, ignore_errors=True)

    # rucio upload, on a subset, under names of their own (a DID name is forever)
    sub = work / "rucio"
    sub.mkdir()
    tag = "r" + uuid.uuid4().hex[:8]
    subset = []
    for f in files[:a.rucio_files]:
        subset.append(sub / f"{tag}.{f.name}")
        os.link(f, subset[-1])
    rucio_names.extend(p.name for p in subset)    # removed from the lake by the caller, whatever happens
    n_r, t_r, note = rucio_upload(lake, subset, work, a.rucio_venv, a.rucio_budget)
    rucio = n_r / t_r if n_r else None
    rows.append((f"rucio upload (rucio-clients 41.5.1, protocol root), first {len(subset)} files, one command",
                 f"{rucio:,.1f} files/s" if rucio else "n/a", f"{n_r} files in {t_r:.1f} s", note, "", ""))

    ceil, row = ceiling(lake, files, a)
    rows.append(row)
    top = ceil.files_s

    destination: dict[str, Any] = {}
    if a.isolate_requests is not None:
        destination["isolate_requests"] = a.isolate_requests == "true"
    if a.puts_per_server is not None:
        destination["puts_per_server"] = a.puts_per_server
    if a.scheme != "http":
        destination["scheme"] = a.scheme
    rule = {"rule_per": a.rule_per} if a.rule_per else {}
    run = agent_e2e(lake, files, work, workers=a.workers, budget=a.budget, copies=a.copies,
                    destination=destination, hash_workers=a.hash_workers, rule=rule)
    rate = run.files_s if run.done else None
    settings = "".join(f", {k} = {v}" for k, v in {**destination, **rule}.items())
    rows.insert(0, (f"edge-agent end to end, Rucio register + rule + confirm, {a.workers} transfer workers, "
                    f"copies = {a.copies} (the agent writes them){settings}",
                    f"{run.files_s:,.1f} files/s",
                    f"{run.done} of {run.files} files in {run.seconds:.1f} s"
                    + (" (time budget reached)" if run.done < run.files else ""),
                    f"{ratio(rate, xrdcp)} x xrdcp; {ratio(rate, rucio)} x rucio upload; "
                    f"{ratio(rate, top)} x the Rucio bulk ceiling",
                    ">= 300 files/s; >= 0.5; >= 20; >= 0.8",
                    f"{verdict(bool(rate and rate >= 300))}; {verdict(bool(rate and rate >= 0.5 * xrdcp))}; "
                    f"{verdict(bool(rate and rucio and rate >= 20 * rucio)) if rucio else 'n/a'}; "
                    f"{verdict(bool(rate and rate >= 0.8 * top)) if top else 'n/a'}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--kib", type=int, default=64)
    ap.add_argument("--budget", type=float, default=600, help="seconds the agent may take")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--hash-workers", type=int, default=2, help="the agent's hash_workers")
    ap.add_argument("--copies", type=int, default=1, choices=(1, 2),
                    help="copies the agent writes (one per lake RSE) and Rucio confirms")
    ap.add_argument("--rule-per", choices=("batch", "file"), default=None,
                    help="the rule's rule_per (default: the agent's, batch)")
    ap.add_argument("--scheme", choices=("http", "root"), default="http",
                    help="the scheme the agent writes its copies in (root: XRootD bindings if importable)")
    ap.add_argument("--isolate-requests", choices=("true", "false"), default=None,
                    help="the destinations' isolate_requests (default: the agent's)")
    ap.add_argument("--puts-per-server", type=int, default=None,
                    help="the destinations' puts_per_server (default: the agent's)")
    ap.add_argument("--rucio-files", type=int, default=200)
    ap.add_argument("--rucio-budget", type=float, default=300)
    ap.add_argument("--rucio-venv", type=Path, default=RUCIO_VENV)
    ap.add_argument("--ceiling-files", type=int, default=3000,
                    help="files the bare bulk client registers (the first of the same files)")
    ap.add_argument("--ceiling-copies", type=int, default=1,
                    help="copies of its rules (replicas registered on that many lake RSEs); the agent row has 1")
    ap.add_argument("--ceiling-batch", type=int, default=None,
                    help="files per bulk call; default: the lake's limit (lake.env), else probed (1,000 or 480)")
    ap.add_argument("--only-ceiling", action="store_true", help="measure the Rucio bulk ceiling alone")
    a = ap.parse_args(argv)
    exit_on_sigterm()
    from lake import start_lake
    lakes = start_lake()
    lake = next(lakes)
    loopback_only(lake.url, lake.http_url, lake.root_url)
    start_load = load()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-small-", dir="/var/tmp"))
    rel = f"data/lake1/edge-bench/{uuid.uuid4().hex[:10]}"
    rows: list[tuple[Any, ...]] = []
    rucio_names: list[str] = []
    try:
        if a.only_ceiling:
            rows.append(ceiling(lake, [], a)[1])
        else:
            compare(lake, a, work, rel, rows, rucio_names)
        version = rucio_version(lake.url)
    finally:
        shutil.rmtree(lake.data_dir / rel, ignore_errors=True)
        for n in rucio_names:
            for p in (lake_file(lake, "lake1", n), lake_file(lake, "lake1", n + ".rucio.upload")):
                p.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        next(lakes, None)
    what = f"{a.ceiling_files} files, the ceiling only" if a.only_ceiling else f"{a.files} x {a.kib} KiB in page cache"
    write_section("benchmarks/small.py" + (" --only-ceiling" if a.only_ceiling else ""), [
        f"Load average at the start: {start_load}. Rucio {version} ({lake.server()}), XRootD "
        f"on loopback; {what}; agent, clients and servers share the cores."],
        ("what", "rate", "detail", "ratio", "target", ""), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
