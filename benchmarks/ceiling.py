"""The ceiling of the Rucio server itself (issue 14): the files registered by a bare client that
makes only the minimal bulk calls, no storage, no agent. benchmarks/small.py reports it beside the
agent, and the agent's ratio to it.

Per batch of B files (B = the lake's bulk limit: 1,000 on PostgreSQL, 480 on SQLite):
  POST /dids/<scope>/<run>.dsNNN          the batch's dataset
  POST /dids/attachments, rse = RSE1      file DIDs + AVAILABLE replicas (bytes, adler32) + attachment
  POST /replicas, rse = RSE2 ...          only with copies > 1: the other copies' replicas
  POST /rules/                            one rule on the batch's dataset, `copies` on those RSEs
then GET /rules/<id> for every rule until each is OK. files/s = files / the whole time.

Why a dataset and a rule per batch rather than one of each for the run: a rule on a dataset of
length x copies >= 10,000 goes to INJECT (it waits for the judge-injector daemon), and on SQLite
a rule of more than ~1,000 locks fails; a batch keeps each rule small and synchronous whatever
the number of files. Why the rule asks for the RSEs that already hold AVAILABLE replicas: its
locks are OK as it is made, so its state answers without any daemon or played transfer; playing
transfers (PUT /replicas state A) is lake-side replication, not the registration a client does.
"""

from __future__ import annotations

import os
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_MAX = 1000      # Rucio's request schema: at most 1,000 items in a list
SQLITE_MAX = 480       # SQLite's expression-depth limit (add_replicas >= 997 files, rules >= ~1,000 locks)


@dataclass(frozen=True)
class Fact:
    """What the catalogue is told about one file."""
    name: str
    nbytes: int
    adler32: str      # 8 lower-case hex digits, as Rucio writes it


@dataclass
class Ceiling:
    files: int                 # files registered (all rules OK), else 0
    seconds: float
    batch: int
    batch_why: str             # where the batch size came from
    calls: int                 # REST calls in the timed part
    rules: int
    rules_ok: int
    note: str = ""

    @property
    def files_s(self) -> float | None:
        return self.files / self.seconds if self.files and self.seconds > 0 else None


class BatchTooLarge(Exception):
    """The first batch of a run whose size was a guess was refused: the lake's limit is lower."""


def facts_of(paths: Sequence[Path]) -> list[Fact]:
    out = []
    for p in paths:
        data = p.read_bytes()
        out.append(Fact(p.name, len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"))
    return out


def random_facts(n: int, size: int, first: int = 0) -> list[Fact]:
    """Facts of n files of random bytes that are never written anywhere (the ceiling needs none),
    named like small.py's files (s00000.dat...) from number `first` on."""
    out = []
    for i in range(first, first + n):
        out.append(Fact(f"s{i:05d}.dat", size, f"{zlib.adler32(os.urandom(size)) & 0xFFFFFFFF:08x}"))
    return out


def bulk_limit(env: Mapping[str, str]) -> tuple[int | None, str]:
    """The lake's bulk limit from its lake.env, or None when it does not say (then it is probed)."""
    if env.get("EDGE_LAKE_RUCIO_BULK_MAX"):
        return int(env["EDGE_LAKE_RUCIO_BULK_MAX"]), "lake.env EDGE_LAKE_RUCIO_BULK_MAX"
    db = env.get("EDGE_LAKE_RUCIO_DB")
    if db:
        return (SQLITE_MAX if db == "sqlite" else SCHEMA_MAX), f"lake.env EDGE_LAKE_RUCIO_DB={db}"
    return None, "probed"


def register(client: Any, scope: str, rses: Sequence[str], facts: Sequence[Fact], *, batch: int,
             copies: int = 1, budget: float = 600, probing: bool = False,
             clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
             ) -> tuple[float, int, int, int, str]:
    """The timed registration (see the module's docstring) of `facts` under fresh names
    (`<run>.<name>`, `<run>.dsNNNN`: a DID name is forever).
    `client` is an edge_agent RucioClient (its request(): token, one call, errors as the taxonomy).
    Returns (seconds, calls, rules, rules OK, note). `probing`: a refused first batch raises
    BatchTooLarge (the call is one transaction: nothing of it stays)."""
    from edge_agent.lake.rucio_client import RucioAnswer

    if copies > len(rses):
        raise ValueError(f"{copies} copies need {copies} RSEs, the lake has {len(rses)}")
    run = "c" + uuid.uuid4().hex[:10]
    expression = "|".join(rses[:copies])
    client.token()                     # authentication is not part of the figure
    calls = 0
    rules: list[str] = []
    t0 = clock()
    for k, start in enumerate(range(0, len(facts), batch)):
        part = facts[start:start + batch]
        ds = f"{run}.ds{k:04d}"
        client.request("POST", f"/dids/{scope}/{ds}", json_body={"type": "DATASET"})
        files = [{"scope": scope, "name": f"{run}.{f.name}", "bytes": f.nbytes, "adler32": f.adler32} for f in part]
        try:
            client.request("POST", "/dids/attachments", json_body={
                "attachments": [{"scope": scope, "name": ds, "rse": rses[0], "dids": files}],
                "ignore_duplicate": True})
        except RucioAnswer as exc:
            if probing and k == 0 and (exc.status or 0) >= 500:
                raise BatchTooLarge(str(exc)) from None
            raise
        calls += 2
        for rse in rses[1:copies]:
            client.request("POST", "/replicas", json_body={"rse": rse, "files": files})
            calls += 1
        r = client.request("POST", "/rules/", json_body={
            "dids": [{"scope": scope, "name": ds}], "account": client.account, "copies": copies,
            "rse_expression": expression, "grouping": "DATASET"})
        rules.extend(str(x) for x in r.json())
        calls += 1
    pending = list(rules)
    states: dict[str, str] = {}
    while pending and clock() - t0 < budget:
        for rule_id in list(pending):
            states[rule_id] = str(client.request("GET", f"/rules/{rule_id}").json().get("state"))
            calls += 1
            if states[rule_id] == "OK":
                pending.remove(rule_id)
        if pending:
            sleep(0.05)
    took = clock() - t0
    note = ""
    if pending:
        seen = sorted({states.get(r, "?") for r in pending})
        note = f"{len(pending)} of {len(rules)} rules not OK after {budget:.0f} s ({', '.join(seen)})"
    return took, calls, len(rules), len(rules) - len(pending), note


def measure(client: Any, scope: str, rses: Sequence[str], facts: Sequence[Fact], env: Mapping[str, str], *,
            copies: int = 1, batch: int | None = None, budget: float = 600,
            clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> Ceiling:
    """The ceiling in batches of `batch`, else of the lake's limit (lake.env), else 1,000 and, if
    the lake refuses a first batch of 1,000 (SQLite), again from the start in batches of 480."""
    why = "--ceiling-batch"
    if batch is None:
        batch, why = bulk_limit(env)
    probing = batch is None
    size = batch or SCHEMA_MAX
    try:
        took, calls, n_rules, ok, note = register(client, scope, rses, facts, batch=size, copies=copies,
                                                  budget=budget, probing=probing, clock=clock, sleep=sleep)
    except BatchTooLarge:
        size, why = SQLITE_MAX, f"probed: a first batch of {SCHEMA_MAX} was refused (SQLite?)"
        took, calls, n_rules, ok, note = register(client, scope, rses, facts, batch=size, copies=copies,
                                                  budget=budget, clock=clock, sleep=sleep)
    else:
        if probing:
            why = f"probed: a first batch of {min(size, len(facts))} accepted"
    done = len(facts) if ok == n_rules else 0
    return Ceiling(done, took, size, why, calls, n_rules, ok, note)
