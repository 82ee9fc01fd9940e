"""What a replication rule per file costs the Rucio server, against one rule per batch (issue 14).

    EDGE_LAKE_ENV=STATE/lake.env .venv/bin/python benchmarks/rule_cost.py [--files 1000] [--batch 200]

The calls the agent's record and confirm steps make, with no storage and no agent, alternating the
two granularities in one run (file, batch, file, batch): per batch of B files, the files attached to
a night's dataset with their replicas on the first RSE and added AVAILABLE on the second, then
  file:   POST /rules/ with B DIDs (one rule each), GET /rules/<id> for each;
  batch:  a dataset of the B files (created, attached, closed), one rule on it, GET the rule and
          GET its locks (rules.*.rule_per = "batch", edge_agent/lake/rucio_rules.py).
Every rule asks 2 copies on the two RSEs that hold the replicas, so it is OK as made. Prints files/s
and calls of each run and the ratio batch / file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

from ceiling import random_facts  # noqa: E402
from common import exit_on_sigterm, loopback_only  # noqa: E402


def one_run(client: Any, scope: str, rses: list[str], n: int, batch: int, per: str) -> tuple[float, int]:
    """(seconds, calls) to register n fresh files and have each one's rule OK, `per` file or batch."""
    run = f"rc{per[0]}{uuid.uuid4().hex[:8]}"
    facts = random_facts(n, 1024)
    night = f"{run}.night"
    client.request("POST", f"/dids/{scope}/{night}", json_body={"type": "DATASET"})
    expression = "|".join(rses)
    calls = 0
    t0 = time.perf_counter()
    for k in range(0, n, batch):
        files = [{"scope": scope, "name": f"{run}.{f.name}", "bytes": f.nbytes, "adler32": f.adler32}
                 for f in facts[k:k + batch]]
        dids = [{"scope": scope, "name": f["name"]} for f in files]
        client.request("POST", "/dids/attachments", json_body={
            "attachments": [{"scope": scope, "name": night, "rse": rses[0], "dids": files}], "ignore_duplicate": True})
        client.request("POST", "/replicas", json_body={"rse": rses[1], "files": files})
        calls += 2
        if per == "file":
            ids = client.request("POST", "/rules/", json_body={"dids": dids, "account": client.account, "copies": 2,
                                                               "rse_expression": expression}).json()
            states = [client.request("GET", f"/rules/{i}").json()["state"] for i in ids]
            calls += 1 + len(ids)
        else:
            ds = f"{run}.rule-{k:06d}"
            client.request("POST", f"/dids/{scope}/{ds}", json_body={"type": "DATASET"})
            client.request("POST", "/dids/attachments", json_body={
                "attachments": [{"scope": scope, "name": ds, "dids": dids}], "ignore_duplicate": True})
            ids = client.request("POST", "/rules/", json_body={"dids": [{"scope": scope, "name": ds}],
                                                               "account": client.account, "copies": 2,
                                                               "rse_expression": expression}).json()
            client.request("PUT", f"/dids/{scope}/{ds}/status", json_body={"open": False})
            states = [client.request("GET", f"/rules/{ids[0]}").json()["state"]]
            locks = client.lines(client.request("GET", f"/rules/{ids[0]}/locks"))
            calls += 6
            if len(locks) != 2 * len(files):
                raise RuntimeError(f"{len(locks)} locks for {len(files)} files x 2 copies")
        if set(states) != {"OK"}:
            raise RuntimeError(f"rules not OK as made: {sorted(set(states))}")
    return time.perf_counter() - t0, calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="file and batch runs, alternating")
    a = ap.parse_args(argv)
    exit_on_sigterm()
    from edge_agent import logs
    from edge_agent.lake.rucio_client import RucioClient
    from edge_agent.settings import RucioSettings
    from lake import start_lake

    logs.setup("warning", "console", stream=open(os.devnull, "w"))
    lake = next(start_lake())
    loopback_only(lake.url)
    if len(lake.lake_rses) < 2:
        raise SystemExit("the lake has fewer than 2 RSEs")
    client = RucioClient(RucioSettings.model_validate({**lake.agent_lake_config()["rucio"], "timeout_seconds": 300}))
    client.token()
    rates: dict[str, list[float]] = {"file": [], "batch": []}
    try:
        for _ in range(a.rounds):
            for per in ("file", "batch"):
                took, calls = one_run(client, lake.scope, lake.lake_rses[:2], a.files, a.batch, per)
                rates[per].append(a.files / took)
                print(f"rule per {per:5s}: {a.files} files in {took:5.1f} s = {a.files / took:6.0f} files/s, "
                      f"{calls} calls", flush=True)
    finally:
        client.close()
    best = {k: max(v) for k, v in rates.items()}
    print(f"batch / file: {best['batch'] / best['file']:.1f} x (best runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
