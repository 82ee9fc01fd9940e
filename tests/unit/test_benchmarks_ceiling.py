"""benchmarks/ceiling.py (the Rucio bulk ceiling of benchmarks/small.py) against a fake Rucio on
httpx.MockTransport: the calls it makes, their bodies and batch sizes, the lake's limit taken from
lake.env or probed. Figures are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from benchmarks.ceiling import Fact, bulk_limit, facts_of, measure, random_facts
from edge_agent.lake.rucio_client import RucioClient
from edge_agent.settings import RucioSettings

ROOT = Path(__file__).resolve().parents[2]
RSES = ["LAKE1", "LAKE2"]


def error(status: int, cls: str, msg: str) -> httpx.Response:
    return httpx.Response(status, headers={"ExceptionClass": cls, "ExceptionMessage": msg},
                          json={"ExceptionClass": cls, "ExceptionMessage": msg})


class FakeRucio:
    """The few calls of the ceiling, with Rucio's all-or-nothing bulk writes and a list limit
    (`limit`: what SQLite's expression depth allows; an answer of 500 DatabaseException beyond).
    A rule must stay synchronous (< 10,000 locks) and, on SQLite (limit 480), under ~1,000 locks."""

    def __init__(self, limit: int = 1000, polls_before_ok: int = 1) -> None:
        self.limit = limit
        self.lock_limit = 999 if limit < 1000 else 9_999
        self.polls_before_ok = polls_before_ok
        self.calls: list[tuple[str, str, Any]] = []
        self.datasets: dict[str, list[str]] = {}
        self.dids: dict[str, tuple[int, str]] = {}
        self.replicas: set[tuple[str, str]] = set()
        self.rules: dict[str, dict[str, Any]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        body = json.loads(request.content) if request.content else None
        if path == "/auth/userpass":
            return httpx.Response(200, headers={"X-Rucio-Auth-Token": "root-ddmlab-unknown-abc"})
        assert request.headers["X-Rucio-Auth-Token"] == "root-ddmlab-unknown-abc"
        self.calls.append((method, path, body))
        if method == "POST" and path.startswith("/dids/test/") and path.count("/") == 3:
            self.datasets[path.rsplit("/", 1)[1]] = []
            return httpx.Response(201, text="Created")
        if method == "POST" and path == "/dids/attachments":
            (att,) = body["attachments"]
            if len(att["dids"]) > self.limit:
                return error(500, "DatabaseException", "(sqlite3.OperationalError) Expression tree is too large")
            for f in att["dids"]:          # one transaction: nothing stays when the call is refused
                self.dids[f["name"]] = (f["bytes"], f["adler32"])
                self.replicas.add((att["rse"], f["name"]))
                self.datasets[att["name"]].append(f["name"])
            return httpx.Response(201, text="Created")
        if method == "POST" and path == "/replicas":
            assert len(body["files"]) <= self.limit
            self.replicas.update((body["rse"], f["name"]) for f in body["files"])
            return httpx.Response(201, text="Created")
        if method == "POST" and path == "/rules/":
            (did,) = body["dids"]
            rid = f"{len(self.rules):032x}"
            rses = body["rse_expression"].split("|")
            locks = len(self.datasets[did["name"]]) * body["copies"]
            assert locks <= self.lock_limit
            ok = all((r, n) in self.replicas for r in rses for n in self.datasets[did["name"]])
            self.rules[rid] = {**body, "polls": 0, "ok": ok}
            return httpx.Response(201, json=[rid])
        if method == "GET" and path.startswith("/rules/"):
            rule = self.rules[path.rsplit("/", 1)[1]]
            rule["polls"] += 1
            state = "OK" if rule["ok"] and rule["polls"] > self.polls_before_ok else "REPLICATING"
            return httpx.Response(200, json={"state": state})
        return error(404, "NotFound", f"{method} {path}")

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.calls if m == method and p == path)


def client(fake: FakeRucio) -> RucioClient:
    return RucioClient(RucioSettings(url="http://rucio.test", account="root",
                                     auth={"type": "userpass", "username": "ddmlab", "password": "pw"}),
                       transport=httpx.MockTransport(fake), sleep=lambda _s: None)


def facts(n: int) -> list[Fact]:
    return [Fact(f"s{i:05d}.dat", 65536, f"{i:08x}") for i in range(n)]


def test_every_file_is_registered_once_in_batches_of_the_lakes_limit_and_every_rule_is_ok() -> None:
    fake = FakeRucio(limit=1000)
    c = measure(client(fake), "test", RSES, facts(2500), {"EDGE_LAKE_RUCIO_BULK_MAX": "1000"}, sleep=lambda _s: None)
    attaches = [b["attachments"][0] for m, p, b in fake.calls if p == "/dids/attachments"]
    assert [len(a["dids"]) for a in attaches] == [1000, 1000, 500]
    assert {a["rse"] for a in attaches} == {"LAKE1"}
    assert all(set(d) == {"scope", "name", "bytes", "adler32"} for a in attaches for d in a["dids"])
    assert len(fake.dids) == 2500 and len({n.split(".", 1)[0] for n in fake.dids}) == 1   # one run's names
    assert sorted(n.split(".", 1)[1] for n in fake.dids) == [f.name for f in facts(2500)]
    assert fake.count("POST", "/rules/") == 3 and fake.count("POST", "/replicas") == 0
    assert all(r["copies"] == 1 and r["rse_expression"] == "LAKE1" and r["polls"] == 2 for r in fake.rules.values())
    assert (c.files, c.batch, c.rules, c.rules_ok, c.note) == (2500, 1000, 3, 3, "")
    assert c.calls == len(fake.calls) and c.batch_why == "lake.env EDGE_LAKE_RUCIO_BULK_MAX"
    assert c.files_s is not None


def test_a_lake_that_refuses_a_first_batch_of_1000_is_measured_again_from_the_start_in_batches_of_480() -> None:
    fake = FakeRucio(limit=480)
    c = measure(client(fake), "test", RSES, facts(1000), {}, sleep=lambda _s: None)
    sizes = [len(b["attachments"][0]["dids"]) for m, p, b in fake.calls if p == "/dids/attachments"]
    assert sizes[0] == 1000 and sizes[-3:] == [480, 480, 40]
    assert len(fake.dids) == 1000 and (c.files, c.batch, c.rules, c.rules_ok) == (1000, 480, 3, 3)
    assert "probed" in c.batch_why
    assert c.calls == 3 * 3 + 3 * 2         # the refused attempt is not part of the figure


def test_the_database_named_in_lake_env_sets_the_batch_without_a_refused_call() -> None:
    assert bulk_limit({"EDGE_LAKE_RUCIO_DB": "sqlite"})[0] == 480
    assert bulk_limit({"EDGE_LAKE_RUCIO_DB": "postgresql"})[0] == 1000
    assert bulk_limit({})[0] is None
    fake = FakeRucio(limit=480)
    c = measure(client(fake), "test", RSES, facts(500), {"EDGE_LAKE_RUCIO_DB": "sqlite"}, sleep=lambda _s: None)
    assert [len(b["attachments"][0]["dids"]) for m, p, b in fake.calls if p == "/dids/attachments"] == [480, 20]
    assert c.files == 500


def test_two_copies_register_the_second_replica_in_bulk_and_ask_both_rses() -> None:
    fake = FakeRucio(limit=480)
    c = measure(client(fake), "test", RSES, facts(600), {}, copies=2, batch=300, sleep=lambda _s: None)
    assert fake.count("POST", "/replicas") == 2
    assert all(r["copies"] == 2 and r["rse_expression"] == "LAKE1|LAKE2" for r in fake.rules.values())
    assert c.files == 600 and c.batch_why == "--ceiling-batch"


def test_rules_not_ok_within_the_budget_give_no_rate_and_say_so() -> None:
    fake = FakeRucio(polls_before_ok=10**9)
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    c = measure(client(fake), "test", RSES, facts(10), {}, budget=5, clock=clock, sleep=lambda _s: None)
    assert c.files == 0 and c.files_s is None and "1 of 1 rules not OK" in c.note and "REPLICATING" in c.note


def test_facts_are_the_files_size_and_adler32(tmp_path: Path) -> None:
    p = tmp_path / "s00000.dat"
    p.write_bytes(b"abc")
    assert facts_of([p]) == [Fact("s00000.dat", 3, "024d0127")]     # adler32("abc")
    more = random_facts(2, 16, first=1)
    assert [f.name for f in more] == ["s00001.dat", "s00002.dat"] and all(len(f.adler32) == 8 for f in more)


def test_small_py_offers_the_ceiling_options() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "small.py"), "--help"], check=False, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(flag in r.stdout for flag in ("--only-ceiling", "--ceiling-files", "--ceiling-batch",
                                             "--ceiling-copies"))
