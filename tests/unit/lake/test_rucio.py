"""CheckedCatalogue against a fake Rucio (httpx.MockTransport) that keeps the catalogue the way 41.5.1 does,
quirks included: a duplicate replica is accepted silently, PUT of an unknown replica is a 500,
metadata keys outside the DID columns are refused when the JSON plugin is off (SQLite)."""

from __future__ import annotations

import dataclasses

import itertools
import json
import re
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from structlog.testing import capture_logs

from edge_agent.core import policy
from edge_agent.core.policy import Replica
from edge_agent.errors import PermanentError, RetryableError
from edge_agent.lake import rucio_rules
from edge_agent.lake.base import CopiesState, LakeFile, ListedFile, ListedReplica, UnknownDid
from edge_agent.lake.rucio import RucioCatalogue, RucioRecords
from edge_agent.lake.rucio_client import RucioClient, RucioPermanent
from edge_agent.settings import Settings
from edge_agent.transfer.base import RemoteStat, Transport
from edge_agent.transfer.mock import MockTransport
from edge_agent.transfer.registry import Transports
from edge_agent.steps.verify import Checks, replicas

PASSWORD = "pw-lake-secret"
STATES = {"A": "AVAILABLE", "C": "COPYING", "U": "UNAVAILABLE", "B": "BEING_DELETED", "D": "BAD",
          "S": "SOURCE", "T": "TEMPORARY_UNAVAILABLE"}
COLUMN_KEYS = {"project", "datatype", "run_number", "stream_name", "campaign", "events", "guid", "bytes",
               "adler32", "md5", "lifetime"}


def err(status: int, cls: str, msg: str) -> httpx.Response:
    return httpx.Response(status, headers={"ExceptionClass": cls, "ExceptionMessage": msg},
                          json={"ExceptionClass": cls, "ExceptionMessage": msg})


class FakeRucio:
    """Just enough of Rucio's REST API, keeping state like the real catalogue."""

    HOST: ClassVar[dict[str, str]] = {"http": "http://xrd:8080", "root": "root://xrd:1094/", "davs": "davs://xrd:8443"}

    def __init__(self) -> None:
        self.rses = {"BUF": {"deterministic": False, "schemes": ["root", "http"]},
                     "LAKE1": {"deterministic": True, "schemes": ["http", "root"]},
                     "LAKE2": {"deterministic": True, "schemes": ["root"]}}
        self.dids: dict[tuple[str, str], dict[str, Any]] = {}
        self.replicas: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.contents: set[tuple[str, str, str, str]] = set()
        self.rules: dict[str, dict[str, Any]] = {}
        self.locked: set[tuple[str, str, str]] = set()
        self.tombstoned: set[tuple[str, str, str]] = set()
        self.json_meta = False            # SQLite: only the DID columns take metadata
        # (rse, scheme) -> the protocol's write priority as /protocols lists it (default 1); and
        # whether a 0 means "first" (Rucio 39 and later) or "not supported" (38 and before)
        self.write_priority: dict[tuple[str, str], int | None] = {}
        self.zero_is_first = True
        self.calls: list[tuple[str, str, Any]] = []
        self.down = False
        self.password = PASSWORD
        self.before_add_replicas: Any = None
        self.refuse_attach: set[str] = set()      # names whose attachment refuses the whole call
        self.fail: dict[tuple[str, str], httpx.Response] = {}
        self.lock_states: dict[tuple[str, str], str] = {}    # (name, RSE): a lock's state, told by the test
        self._ids = itertools.count(1)

    # -- helpers
    def pfn(self, scheme: str, rse: str, scope: str, name: str) -> str:
        rep = self.replicas.get((scope, name, rse))
        if not self.rses[rse]["deterministic"]:
            path = rep["path"] if rep else None
            if path is None:
                return ""
            return f"{self.HOST[scheme]}/data/{rse.lower()}/{path.lstrip('/')}"
        return f"{self.HOST[scheme]}/data/{rse.lower()}/{scope}/{name}"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        path = unquote(request.url.raw_path.decode().split("?")[0])
        body = json.loads(request.content) if request.content else None
        m = request.method
        self.calls.append((m, path, body))
        if (m, path) in self.fail:
            return self.fail[(m, path)]
        if path == "/auth/userpass":
            if request.headers.get("X-Rucio-Password") != self.password:
                return err(401, "CannotAuthenticate", "Cannot authenticate to account root with given credentials")
            return httpx.Response(200, headers={"X-Rucio-Auth-Token": "root-ddmlab-edge-agent-0123",
                                                "X-Rucio-Auth-Token-Expires": "Wed, 25 Nov 2099 14:59:03 UTC"})
        if path == "/ping":
            return httpx.Response(200, json={"version": "41.5.1"})
        if request.headers.get("X-Rucio-Auth-Token") != "root-ddmlab-edge-agent-0123":
            return err(401, "CannotAuthenticate", "Cannot authenticate with given credentials")
        for pattern, handler in self.ROUTES:
            match = re.fullmatch(pattern, f"{m} {path}")
            if match:
                return handler(self, request, body, *match.groups())
        return httpx.Response(404, text=f"no route {m} {path}")

    # -- DIDs
    def get_did(self, request: httpx.Request, body: Any, scope: str, name: str) -> httpx.Response:
        d = self.dids.get((scope, name))
        if d is None:
            return err(404, "DataIdentifierNotFound", f"Data identifier '{scope}:{name}' not found")
        return httpx.Response(200, json={"scope": scope, "name": name, "type": d["type"], "bytes": d.get("bytes"),
                                         "adler32": d.get("adler32"), "md5": d.get("md5"), "open": d.get("open")})

    def bulk_meta(self, request: httpx.Request, body: Any) -> httpx.Response:
        rows = []
        for d in body["dids"]:
            row = self.dids.get((d["scope"], d["name"]))
            if row is not None:      # a missing DID is not listed (Rucio's DID_COLUMN plugin)
                rows.append({"scope": d["scope"], "name": d["name"], "did_type": row["type"],
                             "bytes": row.get("bytes"), "adler32": row.get("adler32"), "md5": row.get("md5")})
        return httpx.Response(200, text="".join(json.dumps(r) + "\n" for r in rows))

    def bulk_set_meta(self, request: httpx.Request, body: Any) -> httpx.Response:
        for d in body["dids"]:          # one transaction: nothing is set unless every entry is taken
            if (d["scope"], d["name"]) not in self.dids:
                return err(404, "DataIdentifierNotFound", f"Data identifier '{d['scope']}:{d['name']}' not found")
            unmanaged = [k for k in d["meta"] if k not in COLUMN_KEYS and not self.json_meta]
            if unmanaged:
                return err(400, "InvalidMetadata", f"No plugin manages metadata keys {unmanaged}")
        for d in body["dids"]:
            self.dids[(d["scope"], d["name"])]["meta"].update(d["meta"])
        return httpx.Response(201, text="Created")

    def list_content(self, request: httpx.Request, body: Any, scope: str, name: str) -> httpx.Response:
        if (scope, name) not in self.dids:
            return err(404, "DataIdentifierNotFound", f"Data identifier '{scope}:{name}' not found")
        rows = [{"scope": cs, "name": cn, "type": self.dids[(cs, cn)]["type"], "bytes": self.dids[(cs, cn)].get("bytes"),
                 "adler32": self.dids[(cs, cn)].get("adler32")}
                for s, n, cs, cn in sorted(self.contents) if (s, n) == (scope, name)]
        return httpx.Response(200, text="".join(json.dumps(r) + "\n" for r in rows))

    def add_did(self, request: httpx.Request, body: Any, scope: str, name: str) -> httpx.Response:
        if scope != "test":
            return err(404, "ScopeNotFound", "Scope not found!")
        if (scope, name) in self.dids:
            return err(409, "DataIdentifierAlreadyExists", "Data Identifier already exists!")
        self.dids[(scope, name)] = {"type": body["type"], "meta": {}, "open": True}
        return httpx.Response(201, text="Created")

    def set_status(self, request: httpx.Request, body: Any, scope: str, name: str) -> httpx.Response:
        d = self.dids.get((scope, name))
        if d is None:
            return err(404, "DataIdentifierNotFound", f"Data identifier '{scope}:{name}' not found")
        if d["type"] == "FILE" or d["open"] is (body["open"] is True):
            return err(409, "UnsupportedOperation", f"The status of the data identifier '{scope}:{name}' cannot "
                       "be changed")
        d["open"] = body["open"]
        return httpx.Response(200, text="")

    def attach(self, request: httpx.Request, body: Any) -> httpx.Response:
        for a in body["attachments"]:
            for c in a["dids"]:
                if c["name"] in self.refuse_attach:     # one transaction: the whole call is refused
                    return err(409, "UnsupportedOperation", "a file of this call cannot be attached")
        for a in body["attachments"]:
            for key in [(a["scope"], a["name"])] + [(c["scope"], c["name"]) for c in a["dids"]]:
                if key not in self.dids:
                    return err(404, "DataIdentifierNotFound", f"Data identifier '{key[0]}:{key[1]}' not found")
        for a in body["attachments"]:
            if self.dids[(a["scope"], a["name"])].get("open") is False:
                return err(409, "UnsupportedOperation", f"Data identifier '{a['scope']}:{a['name']}' is closed")
        for a in body["attachments"]:
            for c in a["dids"]:
                entry = (a["scope"], a["name"], c["scope"], c["name"])
                if entry in self.contents and not body.get("ignore_duplicate"):
                    return err(409, "DuplicateContent", "UNIQUE constraint failed")
                self.contents.add(entry)
        return httpx.Response(201, text="Created")

    def detach(self, request: httpx.Request, body: Any, scope: str, name: str) -> httpx.Response:
        for c in body["dids"]:           # one transaction: a child not attached refuses the call
            if (scope, name, c["scope"], c["name"]) not in self.contents:
                return err(404, "DataIdentifierNotFound", f"Data identifier '{c['scope']}:{c['name']}' not found")
        for c in body["dids"]:
            self.contents.discard((scope, name, c["scope"], c["name"]))
        return httpx.Response(200, text="")

    def set_meta(self, request: httpx.Request, body: Any, scope: str, name: str,
                 key: str | None = None) -> httpx.Response:
        meta = {key: body["value"]} if key else body["meta"]
        unmanaged = [k for k in meta if k not in COLUMN_KEYS and not self.json_meta]
        if unmanaged:
            return err(400, "InvalidMetadata", f"No plugin manages metadata keys {unmanaged} on DID {scope}:{name}")
        d = self.dids[(scope, name)]
        for k, v in meta.items():
            if k in ("bytes", "adler32", "md5"):
                d[k] = v                   # what the real server does with these column keys
            else:
                d["meta"][k] = v
        return httpx.Response(201, text="Created")

    def set_meta_key(self, request: httpx.Request, body: Any, scope: str, name: str, key: str) -> httpx.Response:
        return self.set_meta(request, body, scope, name, key)

    def did_rules(self, request: httpx.Request, body: Any, scope: str, name: str) -> httpx.Response:
        rows = [r for r in self.rules.values() if (r["scope"], r["name"]) == (scope, name)]
        return httpx.Response(200, text="".join(json.dumps(r) + "\n" for r in rows))

    # -- replicas
    def add_replicas(self, request: httpx.Request, body: Any) -> httpx.Response:
        rse = body["rse"]
        if rse not in self.rses:
            return err(404, "RSENotFound", f"RSE '{rse}' cannot be found in vo 'def'")
        if self.before_add_replicas:
            self.before_add_replicas()
        keys = [(f["scope"], f["name"]) for f in body["files"]]
        if any(keys.count(k) > 1 and (k not in self.dids or (*k, rse) not in self.replicas) for k in keys):
            # core.replica inserts the new DIDs and replicas of the call in one go: a new one named
            # twice breaks the primary key, and the whole call is a 500
            return err(500, "RucioException", "(psycopg.errors.UniqueViolation) duplicate key value")
        for f in body["files"]:
            if not self.rses[rse]["deterministic"] and not f.get("pfn"):
                return err(500, "UnsupportedOperation", "Non-deterministic RSE without pfn")
            key = (f["scope"], f["name"])
            if key not in self.dids:
                self.dids[key] = {"type": "FILE", "bytes": f["bytes"], "adler32": f["adler32"],
                                  "md5": f.get("md5"), "meta": {}}
            if (*key, rse) not in self.replicas:   # an existing replica: accepted, nothing changed
                path = None
                if f.get("pfn") and not self.rses[rse]["deterministic"]:
                    path = "/" + urlsplit(f["pfn"]).path.split(f"/data/{rse.lower()}/", 1)[1]
                self.replicas[(*key, rse)] = {"state": STATES[f.get("state", "A")], "path": path,
                                              "pfn": f.get("pfn")}
        return httpx.Response(201, text="Created")

    def update_replicas(self, request: httpx.Request, body: Any) -> httpx.Response:
        for f in body["files"]:
            rep = self.replicas.get((f["scope"], f["name"], body["rse"]))
            if rep is None:
                return err(500, "ReplicaNotFound", f"No row found for scope: {f['scope']} name: {f['name']} "
                           f"rse: {body['rse']}")
            if f["state"] not in STATES:
                return err(400, "ValueError", f"'{f['state']}' is not a valid ReplicaState")
            rep["state"] = STATES[f["state"]]
        return httpx.Response(200, text="")

    def list_replicas(self, request: httpx.Request, body: Any) -> httpx.Response:
        out = []
        schemes = body.get("schemes")
        for did in body["dids"]:
            key = (did["scope"], did["name"])
            if key not in self.dids:
                continue
            d = self.dids[key]
            reps = {rse: r for (s, n, rse), r in self.replicas.items() if (s, n) == key}
            if not body.get("all_states"):
                reps = {k: v for k, v in reps.items() if v["state"] == "AVAILABLE"}
            rses: dict[str, list[str]] = {}
            for rse in reps:
                for scheme in self.rses[rse]["schemes"]:
                    if schemes is None or scheme in schemes:
                        rses.setdefault(rse, []).append(self.pfn(scheme, rse, *key))
                        if schemes is None:
                            break
            out.append({"scope": key[0], "name": key[1], "bytes": d["bytes"], "adler32": d["adler32"],
                        "md5": d.get("md5"), "rses": rses,
                        "pfns": {p: {"rse": rse} for rse, ps in rses.items() for p in ps},
                        "states": {rse: r["state"] for rse, r in reps.items()}})
        return httpx.Response(200, text="".join(json.dumps(x) + "\n" for x in out))

    def tombstone(self, request: httpx.Request, body: Any) -> httpx.Response:
        for r in body["replicas"]:
            key = (r["scope"], r["name"], r["rse"])
            if key not in self.replicas:
                return err(404, "ReplicaNotFound", f"Replica {r['scope']}:{r['name']} on RSE {r['rse']} could not "
                           "be found.")
            if key in self.locked:
                return err(423, "ReplicaIsLocked", f"Replica {r['scope']}:{r['name']} on RSE {r['rse']} is locked.")
            self.tombstoned.add(key)
        return httpx.Response(201, text="Created")

    # -- RSEs
    def protocols(self, request: httpx.Request, body: Any, rse: str) -> httpx.Response:
        if rse not in self.rses:
            return err(404, "RSENotFound", f"RSE '{rse}' cannot be found in vo 'def'")
        return httpx.Response(200, json=[{"scheme": s, "domains": {
            "wan": {"read": 1, "write": self.write_priority.get((rse, s), 1)}}} for s in self.rses[rse]["schemes"]])

    def lfns2pfns(self, request: httpx.Request, body: Any, rse: str) -> httpx.Response:
        scheme = request.url.params["scheme"]
        priority = self.write_priority.get((rse, scheme), 1)
        writes = priority is not None and (priority > 0 or self.zero_is_first)
        if scheme not in self.rses[rse]["schemes"] or (request.url.params.get("operation") == "write" and not writes):
            return err(500, "RSEProtocolNotSupported", "No protocol for provided settings found")
        return httpx.Response(200, json={lfn: self.pfn(scheme, rse, *lfn.split(":", 1))
                                         for lfn in request.url.params.get_list("lfn")})

    # -- rules
    def add_rule(self, request: httpx.Request, body: Any) -> httpx.Response:
        # one rule per DID, in one transaction: any refusal refuses them all (Rucio's core.rule.add_rule)
        for did in body["dids"]:
            if (did["scope"], did["name"]) not in self.dids:
                return err(404, "DataIdentifierNotFound", "Data identifier not found")
            for r in self.rules.values():
                if (r["scope"], r["name"], r["account"], r["rse_expression"], r["copies"]) == \
                        (did["scope"], did["name"], body["account"], body["rse_expression"], body["copies"]):
                    return err(409, "DuplicateRule", "UNIQUE constraint failed: rules.scope, rules.name, ...")
        ids = []
        for did in body["dids"]:
            rid = f"{next(self._ids):032x}"
            sources = body.get("source_replica_expression")
            self.rules[rid] = {"id": rid, "scope": did["scope"], "name": did["name"], "account": body["account"],
                               "rse_expression": body["rse_expression"], "copies": body["copies"],
                               "source_replica_expression": sources, "state": "REPLICATING", "error": None,
                               "body": body}
            if self.dids[(did["scope"], did["name"])]["type"] != "FILE":
                # a rule on a collection locks the files it holds as it is made (not later ones)
                self.rules[rid]["files"] = sorted((cs, cn) for s, n, cs, cn in self.contents
                                                  if (s, n) == (did["scope"], did["name"]))
                self.rules[rid]["state"] = None      # from its locks, as Rucio keeps it
            offsite = [rse for (s, n, rse), r in self.replicas.items()
                       if (s, n) == (did["scope"], did["name"]) and self.rses[rse]["deterministic"]
                       and r["state"] == "AVAILABLE"]
            if sources and not offsite:     # what 41.5.1 does when the rule's sources hold no copy yet
                self.rules[rid].update(state="STUCK", error="MissingSourceReplica")
            ids.append(rid)
        return httpx.Response(201, text=json.dumps(ids))

    def get_rule(self, request: httpx.Request, body: Any, rid: str) -> httpx.Response:
        if rid not in self.rules:
            return err(404, "RuleNotFound", f"No rule with the id {rid} found")
        rule = dict(self.rules[rid])
        if rule["state"] is None:
            states = [lock["state"] for lock in self.locks_of(rid)]
            rule["state"] = "STUCK" if "STUCK" in states else "REPLICATING" if "REPLICATING" in states else "OK"
        return httpx.Response(200, json=rule)

    def locks_of(self, rid: str) -> list[dict[str, Any]]:
        """A collection rule's locks: per file, `copies` RSEs of its expression, those holding a
        replica first; OK where that replica is AVAILABLE (or as `lock_states` says)."""
        rule = self.rules[rid]
        expression = rule["rse_expression"]
        rses = expression.split("|") if all(r in self.rses for r in expression.split("|")) else \
            [r for r in self.rses if self.rses[r]["deterministic"]]
        out = []
        for scope, name in rule.get("files", []):
            held = sorted(rses, key=lambda r: (scope, name, r) not in self.replicas)[:rule["copies"]]
            for rse in held:
                rep = self.replicas.get((scope, name, rse))
                state = "OK" if rep and rep["state"] == "AVAILABLE" else "REPLICATING"
                out.append({"scope": scope, "name": name, "rse": rse, "rule_id": rid,
                            "state": self.lock_states.get((name, rse), state)})
        return out

    def rule_locks(self, request: httpx.Request, body: Any, rid: str) -> httpx.Response:
        if rid not in self.rules:
            return err(404, "RuleNotFound", f"No rule with the id {rid} found")
        return httpx.Response(200, text="".join(json.dumps(x) + "\n" for x in self.locks_of(rid)))

    ROUTES: ClassVar[list[tuple[str, Any]]] = [
        (r"POST /dids/attachments", attach),
        (r"POST /dids/bulkmeta", bulk_meta),
        (r"POST /dids/bulkdidsmeta", bulk_set_meta),
        (r"GET /dids/([^/]+)/([^/]+)/rules", did_rules),
        (r"GET /dids/([^/]+)/([^/]+)/dids", list_content),
        (r"DELETE /dids/([^/]+)/([^/]+)/dids", detach),
        (r"POST /dids/([^/]+)/([^/]+)/meta/([^/]+)", set_meta_key),
        (r"POST /dids/([^/]+)/([^/]+)/meta", set_meta),
        (r"GET /dids/([^/]+)/([^/]+)", get_did),
        (r"POST /dids/([^/]+)/([^/]+)", add_did),
        (r"PUT /dids/([^/]+)/([^/]+)/status", set_status),
        (r"POST /replicas/list", list_replicas),
        (r"POST /replicas/tombstone", tombstone),
        (r"POST /replicas", add_replicas),
        (r"PUT /replicas", update_replicas),
        (r"GET /rses/([^/]+)/protocols", protocols),
        (r"GET /rses/([^/]+)/lfns2pfns", lfns2pfns),
        (r"POST /rules/", add_rule),
        (r"GET /rules/([^/]+)/locks", rule_locks),
        (r"GET /rules/([^/]+)", get_rule),
    ]

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.calls if (m, p) == (method, path))


class CheckedCatalogue(RucioCatalogue):
    """The Rucio catalogue with the transports the agent would have (`transports` by scheme), and
    its replicas as the confirm step sees them: what Rucio records, each asked of its storage."""

    def __init__(self, settings: Settings, transports: dict[str, Transport], client: RucioClient,
                 max_bytes: dict[str, int] | None = None) -> None:
        super().__init__(settings, client, schemes=list(transports), max_bytes=max_bytes)
        self.transports = Transports()
        for scheme, transport in transports.items():
            self.transports.mount(f"{scheme}://", transport)

    def replicas(self, f: LakeFile) -> list[Replica]:
        return replicas(self.recorded(f), f, self.transports, Checks.of(self.settings))


def make_settings(tmp: Path, **rucio: Any) -> Settings:
    return Settings(
        state_dir=str(tmp / "state"),
        lake={"kind": "rucio", "rucio": {"url": "http://rucio.test", "account": "root",
                                         "auth": {"type": "userpass", "username": "ddmlab", "password": PASSWORD},
                                         "schemes": ["davs", "https", "root", "http"], **rucio}},
        destinations={"lake1": {"kind": "rse", "rse": "LAKE1"},
                      "lake2": {"kind": "rse", "rse": "LAKE2", "scheme": "root"}},
        rules={
            "push": {"directory": str(tmp / "daq"), "scope": "test", "destinations": ["lake1"], "copies": 2,
                     "rse_expression": "lake=true", "rule_lifetime_seconds": 86400, "activity": "Raw Data",
                     "grouping": "NONE"},
            "both": {"directory": str(tmp / "daq2"), "scope": "test", "destinations": ["lake1", "lake2"],
                     "copies": 2},
            "reg": {"directory": str(tmp / "buf"), "scope": "test", "inject": "register", "buffer_rse": "BUF",
                    "buffer_url": "root://daq.example:1094//data/buf/", "rse_expression": "lake=true",
                    "copies": 2, "container_template": "cont.{night}"},
        })


def lake_file(tmp: Path, rule: str = "push", name: str = "f1", size: int = 10, adler32: str = "0000000a",
              rel: str = "run42/f1.fits", **kw: Any) -> LakeFile:
    directory = {"push": "daq", "both": "daq2", "reg": "buf"}[rule]
    dests = {"push": ("lake1",), "both": ("lake1", "lake2"), "reg": ()}[rule]
    base: dict[str, Any] = {
        "rule": rule, "scope": "test", "name": name, "dataset": "ds.20261125", "size": size, "adler32": adler32,
        "md5": "0123456789abcdef0123456789abcdef", "blake3": "b" * 64, "copies": 2, "destinations": dests,
        "local_path": str(tmp / directory / rel), "metadata": {}}
    return LakeFile(**{**base, **kw})


@pytest.fixture
def rucio() -> FakeRucio:
    return FakeRucio()


@pytest.fixture
def transports() -> dict[str, MockTransport]:
    return {"http": MockTransport("http"), "root": MockTransport("root")}


@pytest.fixture
def make_lake(tmp_path: Path, rucio: FakeRucio, transports: dict[str, MockTransport]) -> Any:
    def make(**rucio_settings: Any) -> CheckedCatalogue:
        s = make_settings(tmp_path, **rucio_settings)
        assert s.lake.rucio is not None
        client = RucioClient(s.lake.rucio, transport=httpx.MockTransport(rucio), sleep=lambda t: None)
        return CheckedCatalogue(s, dict(transports), client)
    return make


@pytest.fixture
def lake(make_lake: Any) -> CheckedCatalogue:
    return make_lake()


# ---------------------------------------------------------------- register

def test_push_register_creates_did_replica_dataset_and_is_idempotent(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                     tmp_path: Path) -> None:
    f = lake_file(tmp_path)
    lake.register(f)
    lake.register(f)                       # a crash after the effect: done again, no error
    assert rucio.dids[("test", "f1")] == {"type": "FILE", "bytes": 10, "adler32": "0000000a",
                                          "md5": "0123456789abcdef0123456789abcdef", "meta": {}}
    assert rucio.replicas[("test", "f1", "LAKE1")]["state"] == "COPYING"
    assert rucio.dids[("test", "ds.20261125")]["type"] == "DATASET"
    assert rucio.contents == {("test", "ds.20261125", "test", "f1")}
    assert lake.name_pattern == r"^[A-Za-z0-9][A-Za-z0-9.\-_]{1,250}$"


def test_register_again_after_upload_keeps_the_replica_available(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                 tmp_path: Path) -> None:
    f = lake_file(tmp_path)
    lake.register(f)
    lake.add_replica(f, "LAKE1", "http://xrd:8080/data/lake1/test/f1")
    lake.register(f)
    assert rucio.replicas[("test", "f1", "LAKE1")]["state"] == "AVAILABLE"


def test_a_did_with_other_content_is_permanent_and_gets_no_replica(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                   tmp_path: Path) -> None:
    rucio.dids[("test", "f1")] = {"type": "FILE", "bytes": 11, "adler32": "0000000b", "meta": {}}
    with pytest.raises(PermanentError, match=r"already holds test:f1 with other content \(11 bytes, adler32 "
                                             r"0000000b\); the local file has 10 bytes, adler32 0000000a"):
        lake.register(lake_file(tmp_path))
    assert rucio.replicas == {}


def test_a_duplicate_replica_silently_accepted_with_other_checksum_is_caught(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                             tmp_path: Path) -> None:
    # someone registers the same name between our look and our POST: Rucio answers 201 for ours
    def race() -> None:
        rucio.dids.setdefault(("test", "f1"), {"type": "FILE", "bytes": 10, "adler32": "deadbeef", "meta": {}})
    rucio.before_add_replicas = race
    with pytest.raises(PermanentError, match="adler32 deadbeef"):
        lake.register(lake_file(tmp_path))
    assert rucio.contents == set()         # not attached to our dataset


def test_md5_mismatch_is_other_content(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    rucio.dids[("test", "f1")] = {"type": "FILE", "bytes": 10, "adler32": "0000000A", "md5": "f" * 32, "meta": {}}
    with pytest.raises(PermanentError, match="other content"):
        lake.register(lake_file(tmp_path))


def test_same_content_registered_before_is_fine(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    rucio.dids[("test", "f1")] = {"type": "FILE", "bytes": 10, "adler32": "0000000A", "md5": None, "meta": {}}
    lake.register(lake_file(tmp_path))
    assert ("test", "f1", "LAKE1") in rucio.replicas


def test_a_name_taken_by_a_dataset_is_permanent(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    rucio.dids[("test", "f1")] = {"type": "DATASET", "meta": {}}
    with pytest.raises(PermanentError, match="as a DATASET"):
        lake.register(lake_file(tmp_path))


def test_unknown_scope_is_permanent(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    rucio.fail[("POST", "/replicas")] = err(404, "ScopeNotFound", "Scope not found!")
    with pytest.raises(PermanentError, match="POST /replicas .*404 ScopeNotFound"):
        lake.register(lake_file(tmp_path))


def test_register_in_place_builds_the_pfn_and_the_container(lake: CheckedCatalogue, rucio: FakeRucio,
                                                            tmp_path: Path) -> None:
    f = lake_file(tmp_path, "reg", rel="night1/run 42/f1.fits", container="cont.20261125")
    assert lake.buffer_pfn(f) == "root://daq.example:1094//data/buf/night1/run 42/f1.fits"
    lake.register(f)
    lake.register(f)
    rep = rucio.replicas[("test", "f1", "BUF")]
    assert rep["state"] == "AVAILABLE" and rep["pfn"] == "root://daq.example:1094//data/buf/night1/run 42/f1.fits"
    assert rucio.dids[("test", "cont.20261125")]["type"] == "CONTAINER"
    assert rucio.contents == {("test", "cont.20261125", "test", "ds.20261125"),
                              ("test", "ds.20261125", "test", "f1")}
    assert lake.targets(f) == []


def test_buffer_url_without_trailing_slash(make_lake: Any, tmp_path: Path) -> None:
    lake = make_lake()
    lake.settings.rules["reg"].buffer_url = "http://daq.example/buf"
    assert lake.buffer_pfn(lake_file(tmp_path, "reg", rel="a/b.fits")) == "http://daq.example/buf/a/b.fits"


@pytest.mark.parametrize("rel", ["run?1/f.fits", "f#1.fits", "50%.fits", "bad\nname"])
def test_register_in_place_refuses_paths_a_url_cannot_carry(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path,
                                                            rel: str) -> None:
    with pytest.raises(PermanentError, match="cannot register .* in place"):
        lake.register(lake_file(tmp_path, "reg", rel=rel))
    assert rucio.calls == []               # refused before asking anything


def test_register_in_place_refuses_files_outside_the_directory(lake: CheckedCatalogue, tmp_path: Path) -> None:
    f = lake_file(tmp_path, "reg", local_path=str(tmp_path / "elsewhere" / "f1.fits"))
    with pytest.raises(PermanentError, match="not below the rule's directory"):
        lake.register(f)


def test_the_dataset_is_created_once_per_lake(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    lake.register(lake_file(tmp_path, name="f1"))
    lake.register(lake_file(tmp_path, name="f2", rel="run42/f2.fits"))
    assert rucio.count("POST", "/dids/test/ds.20261125") == 1
    assert {c[3] for c in rucio.contents} == {"f1", "f2"}


def test_a_dataset_removed_behind_our_back_is_created_again(lake: CheckedCatalogue, rucio: FakeRucio,
                                                            tmp_path: Path) -> None:
    lake.register(lake_file(tmp_path, name="f1"))
    del rucio.dids[("test", "ds.20261125")]
    lake.register(lake_file(tmp_path, name="f2"))
    assert rucio.dids[("test", "ds.20261125")]["type"] == "DATASET"
    assert ("test", "ds.20261125", "test", "f2") in rucio.contents


def test_no_dataset_no_attachment(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    lake.register(lake_file(tmp_path, dataset=None))
    assert rucio.count("POST", "/dids/attachments") == 0


# ---------------------------------------------------------------- metadata

def test_metadata_the_server_accepts_is_set(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    rucio.json_meta = True
    lake.register(lake_file(tmp_path, metadata={"instrument": "cam", "exptime": 3.5, "run_number": 42}))
    assert rucio.dids[("test", "f1")]["meta"] == {"instrument": "cam", "exptime": 3.5, "run_number": 42}


def test_refused_metadata_keys_are_a_warning_and_skipped_afterwards(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                    tmp_path: Path) -> None:
    with capture_logs() as captured:
        lake.register(lake_file(tmp_path, metadata={"instrument": "cam", "run_number": 42}))
    assert rucio.dids[("test", "f1")]["meta"] == {"run_number": 42}          # the file and the managed key
    assert ("test", "f1", "LAKE1") in rucio.replicas
    assert any(e["log_level"] == "warning" and e.get("key") == "instrument" for e in captured)
    before = len(rucio.calls)
    lake.register(lake_file(tmp_path, name="f2", metadata={"instrument": "cam", "run_number": 43}))
    meta_calls = [(m, p, b) for m, p, b in rucio.calls[before:] if "meta" in p and p != "/dids/bulkmeta"]
    # the refused key is not sent again: one bulk call with the managed key alone
    assert meta_calls == [("POST", "/dids/bulkdidsmeta", {"dids": [{"scope": "test", "name": "f2",
                                                                    "meta": {"run_number": 43}}]})]


def test_metadata_never_rewrites_size_or_checksum(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    with capture_logs() as captured:
        lake.register(lake_file(tmp_path, metadata={"adler32": "ffffffff", "bytes": 1, "project": "p"}))
    d = rucio.dids[("test", "f1")]
    assert (d["bytes"], d["adler32"], d["meta"]) == (10, "0000000a", {"project": "p"})
    assert any("adler32" in e.get("keys", []) for e in captured)


def test_metadata_trouble_that_passes_is_retried(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    rucio.fail[("POST", "/dids/test/f1/meta")] = err(503, "DatabaseException", "too many requests")
    rucio.fail[("POST", "/dids/bulkdidsmeta")] = err(503, "DatabaseException", "too many requests")
    with pytest.raises(RetryableError):
        lake.register(lake_file(tmp_path, metadata={"project": "p"}))


# ---------------------------------------------------------------- targets and replicas written

def test_targets_use_lfns2pfns_with_the_first_usable_scheme(lake: CheckedCatalogue, transports: dict[str, MockTransport],
                                                            tmp_path: Path) -> None:
    # LAKE1 offers http and root; preference davs, https, root, http; transports http and root: root
    [t] = lake.targets(lake_file(tmp_path))
    assert (t.location, t.url, lake.transports.for_url(t.url)) == ("LAKE1", "root://xrd:1094//data/lake1/test/f1",
                                                                   transports["root"])


def test_a_hashing_job_asks_rucio_for_its_names_and_pfns_once_not_per_file(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    """Two or three calls per file (GET /dids for a free name, lfns2pfns per RSE) were what a night
    of small files waited for: the server's CPU. A job asks them for all its files at once."""
    files = [lake_file(tmp_path, "both", name=f"f{i}") for i in range(30)]
    lake.register(files[3])                                   # one name Rucio holds already
    before = len(rucio.calls)
    lake.foresee(files)
    asked = [(m, p) for m, p, _ in rucio.calls[before:]]
    assert asked.count(("POST", "/dids/bulkmeta")) == 1
    assert sorted(p for m, p in asked if p.endswith("lfns2pfns")) == ["/rses/LAKE1/lfns2pfns", "/rses/LAKE2/lfns2pfns"]
    before = len(rucio.calls)
    free = [lake.name_free("test", f.name) for f in files]
    targets = [lake.targets(f) for f in files]
    assert rucio.calls[before:] == []                         # all answered from what was asked ahead
    assert free == [i != 3 for i in range(30)]
    assert targets[7] == lake.targets(lake_file(tmp_path, "both", name="f7"))
    assert [t.url for t in targets[7]] == ["root://xrd:1094//data/lake1/test/f7", "root://xrd:1094//data/lake2/test/f7"]


def test_names_asked_ahead_are_asked_again_once_the_answer_is_old(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_agent.lake.rucio as mod
    files = [lake_file(tmp_path, "both", name=f"g{i}") for i in range(3)]
    lake.foresee(files)
    lake.register(files[0])                                   # registered by someone after the look
    now = [mod.time.monotonic() + mod.NAMES_FRESH_S + 1]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    before = rucio.count("GET", "/dids/test/g0")
    assert lake.name_free("test", "g0") is False              # asked again: Rucio holds it now
    assert rucio.count("GET", "/dids/test/g0") == before + 1


def test_a_job_rucio_cannot_answer_ahead_is_asked_file_by_file(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    files = [lake_file(tmp_path, "both", name=f"h{i}") for i in range(3)]
    rucio.down = True
    lake.foresee(files)                                       # never raises: a hint
    rucio.down = False
    assert lake.name_free("test", "h1") is True
    assert rucio.count("GET", "/dids/test/h1") == 1


def test_targets_honour_a_destination_scheme(lake: CheckedCatalogue, tmp_path: Path) -> None:
    lake.settings.destinations["lake1"].scheme = "http"
    ts = lake.targets(lake_file(tmp_path, "both"))
    assert [(t.location, t.url) for t in ts] == [("LAKE1", "http://xrd:8080/data/lake1/test/f1"),
                                                  ("LAKE2", "root://xrd:1094//data/lake2/test/f1")]


def test_no_common_scheme_is_permanent_and_says_why(make_lake: Any, tmp_path: Path) -> None:
    lake = make_lake(schemes=["davs"])
    with pytest.raises(PermanentError, match=r"no way to upload to RSE LAKE1: it offers \['http', 'root'\]"):
        lake.targets(lake_file(tmp_path))


@pytest.mark.parametrize(("zero_is_first", "scheme", "asked"), [(True, "root", 2), (False, "http", 3)],
                         ids=["zero-first (Rucio 39+)", "zero-unsupported (Rucio 38)"])
def test_a_write_priority_0_means_what_the_server_says_it_means(lake: CheckedCatalogue, rucio: FakeRucio,
                                                              tmp_path: Path, zero_is_first: bool, scheme: str,
                                                              asked: int) -> None:
    """Rucio 38 lists an operation a protocol does not support with priority 0; Rucio 39 and later
    list it null, and 0 is the first priority. LAKE1's root protocol says write 0: the agent asks
    the server (the first file's PFN for writing in root) once and uploads over root only where it
    answers one."""
    rucio.write_priority[("LAKE1", "root")] = 0
    rucio.zero_is_first = zero_is_first
    for name in ("f1", "f2"):
        [t] = lake.targets(lake_file(tmp_path, name=name))
        assert t.url.startswith(f"{scheme}://"), t.url
    # zero-first: f1's answer is its PFN, f2's PFN; zero-unsupported: the refusal, then each file's http PFN
    assert rucio.count("GET", "/rses/LAKE1/lfns2pfns") == asked


def test_a_write_priority_0_of_a_scheme_the_agent_will_not_use_is_never_asked(
        make_lake: Any, rucio: FakeRucio, tmp_path: Path) -> None:
    """Only what the agent would choose is asked about: a 0 on root, with lake.rucio.schemes = http,
    costs no question (whose failure would hold every file of the RSE back)."""
    lake = make_lake(schemes=["http"])
    rucio.write_priority[("LAKE1", "root")] = 0
    [t] = lake.targets(lake_file(tmp_path))
    assert t.url.startswith("http://")
    assert rucio.count("GET", "/rses/LAKE1/lfns2pfns") == 1       # the http PFN, no question about root


def test_the_answer_about_a_write_priority_0_is_asked_again_as_protocols_are(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that upgrades Rucio (or changes the protocol) is believed once the protocols are read again."""
    import edge_agent.lake.rucio as mod
    rucio.write_priority[("LAKE1", "root")] = 0
    rucio.zero_is_first = False
    [t] = lake.targets(lake_file(tmp_path, name="f1"))
    assert t.url.startswith("http://")
    rucio.zero_is_first = True                      # upgraded to a release that reads 0 as "first"
    now = [mod.time.monotonic() + mod.PROTOCOLS_TTL_S + 1]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    [t] = lake.targets(lake_file(tmp_path, name="f2"))
    assert t.url.startswith("root://")


def test_a_write_priority_null_is_no_write_in_any_release(lake: CheckedCatalogue, rucio: FakeRucio,
                                                        tmp_path: Path) -> None:
    rucio.write_priority[("LAKE1", "root")] = None
    rucio.write_priority[("LAKE1", "http")] = None
    with pytest.raises(PermanentError, match=r"no way to upload to RSE LAKE1: it offers no writable protocol"):
        lake.targets(lake_file(tmp_path))
    assert not any(p.endswith("lfns2pfns") for m, p, _ in rucio.calls)


def test_unknown_rse_is_permanent(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    del rucio.rses["LAKE1"]
    with pytest.raises(PermanentError, match="RSENotFound"):
        lake.targets(lake_file(tmp_path))


def test_add_replica_marks_available_and_creates_a_missing_one(lake: CheckedCatalogue, rucio: FakeRucio,
                                                               tmp_path: Path) -> None:
    f = lake_file(tmp_path, "both")
    lake.register(f)
    lake.add_replica(f, "LAKE1", "root://xrd:1094//data/lake1/test/f1")
    lake.add_replica(f, "LAKE2", "root://xrd:1094//data/lake2/test/f1")    # not registered yet: POST
    lake.add_replica(f, "LAKE2", "root://xrd:1094//data/lake2/test/f1")    # again: PUT, fine
    assert {k[2]: v["state"] for k, v in rucio.replicas.items()} == {"LAKE1": "AVAILABLE", "LAKE2": "AVAILABLE"}
    post = [b for m, p, b in rucio.calls if (m, p) == ("POST", "/replicas") and b["rse"] == "LAKE2"]
    assert post[0]["files"][0] == {"scope": "test", "name": "f1", "bytes": 10, "adler32": "0000000a",
                                   "md5": "0123456789abcdef0123456789abcdef", "state": "A",
                                   "pfn": "root://xrd:1094//data/lake2/test/f1"}


# ---------------------------------------------------------------- rules

def test_request_copies_makes_one_rule_and_returns_its_id_again(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                tmp_path: Path) -> None:
    f = lake_file(tmp_path)
    lake.register(f)
    ref = lake.request_copies(f)
    assert ref and lake.request_copies(f) == ref and len(rucio.rules) == 1
    assert rucio.rules[ref]["body"] == {"dids": [{"scope": "test", "name": "f1"}], "account": "root", "copies": 2,
                                        "rse_expression": "lake=true", "grouping": "NONE", "lifetime": 86400,
                                        "activity": "Raw Data"}


def test_request_copies_defaults_to_the_destinations(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    f = lake_file(tmp_path, "both")
    lake.register(f)
    ref = lake.request_copies(f)
    assert ref is not None
    assert rucio.rules[ref]["rse_expression"] == "LAKE1|LAKE2" and rucio.rules[ref]["body"]["grouping"] == "DATASET"


def test_copies_state(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    f = lake_file(tmp_path)
    lake.register(f)
    ref = lake.request_copies(f)
    assert lake.copies_state(f, ref) == "REPLICATING"
    assert ref is not None
    rucio.rules[ref]["state"] = "OK"
    assert lake.copies_state(f, ref) == "OK"
    del rucio.rules[ref]
    assert lake.copies_state(f, ref) == "MISSING"
    assert lake.copies_state(f, None) is None


def rule_calls(rucio: FakeRucio) -> list[tuple[int, str | None]]:
    """(copies, source_replica_expression) of each POST /rules/, in order."""
    return [(b["copies"], b.get("source_replica_expression")) for m, p, b in rucio.calls if (m, p) == ("POST", "/rules/")]


def copies_asked_in_place(lake: CheckedCatalogue, tmp_path: Path) -> tuple[LakeFile, str, str, str]:
    """A buffer file registered in place, its copies asked: (file, ref, first rule, rule for the rest)."""
    f = lake_file(tmp_path, "reg", rel="night1/f1.fits")
    lake.register(f)
    ref = lake.request_copies(f)
    assert ref is not None
    first, rest = ref.split(",")
    return f, ref, first, rest


def test_register_asks_one_copy_from_the_buffer_then_the_rest_from_that_copy(lake: CheckedCatalogue,
                                                                              rucio: FakeRucio,
                                                                              tmp_path: Path) -> None:
    f, ref, first, rest = copies_asked_in_place(lake, tmp_path)
    # first one copy: its only source is the buffer; then all copies, read only off-site
    assert rule_calls(rucio) == [(1, None), (2, "(lake=true)\\BUF")]
    assert rucio.rules[first]["body"] == {"dids": [{"scope": "test", "name": "f1"}], "account": "root", "copies": 1,
                                          "rse_expression": "lake=true", "grouping": "DATASET"}
    assert rucio.rules[rest]["body"] == {**rucio.rules[first]["body"], "copies": 2,
                                         "source_replica_expression": "(lake=true)\\BUF"}
    # asked again (a crash before the ref was kept): the same two rules, found
    assert lake.request_copies(f) == ref and len(rucio.rules) == 2


def test_register_copies_state_waits_for_the_buffer_copy_then_for_the_rest(lake: CheckedCatalogue,
                                                                           rucio: FakeRucio,
                                                                           tmp_path: Path) -> None:
    f, ref, first, rest = copies_asked_in_place(lake, tmp_path)
    # Rucio placed the second rule before its source existed: STUCK, which is no problem yet
    assert (rucio.rules[rest]["state"], rucio.rules[rest]["error"]) == ("STUCK", "MissingSourceReplica")
    before = rucio.count("GET", f"/rules/{rest}")
    assert lake.copies_state(f, ref) == "REPLICATING"
    assert rucio.count("GET", f"/rules/{rest}") == before      # not asked while the first is not OK
    rucio.rules[first]["state"] = "STUCK"                        # the uplink transfer failed: that is news
    assert lake.copies_state(f, ref) == "STUCK"
    rucio.rules[first]["state"] = "OK"
    assert lake.copies_state(f, ref) == "REPLICATING"          # the judge-repairer has not come by yet
    rucio.rules[rest].update(state="STUCK", error="transfer failed")
    assert lake.copies_state(f, ref) == "STUCK"
    rucio.rules[rest].update(state="SUSPENDED", error=None)
    assert lake.copies_state(f, ref) == "SUSPENDED"
    rucio.rules[rest]["state"] = "REPLICATING"
    assert lake.copies_state(f, ref) == "REPLICATING"
    rucio.rules[rest]["state"] = "OK"
    assert lake.copies_state(f, ref) == "OK"                   # OK only when both are


@pytest.mark.parametrize("gone", [0, 1])
def test_register_either_rule_gone_is_missing_and_asked_again(lake: CheckedCatalogue, rucio: FakeRucio,
                                                              tmp_path: Path, gone: int) -> None:
    f = lake_file(tmp_path, "reg", rel="night1/f1.fits")
    lake.register(f)
    ref = lake.request_copies(f)
    assert ref is not None
    ids = ref.split(",")
    for rid in ids:
        rucio.rules[rid]["state"] = "OK"
    del rucio.rules[ids[gone]]
    assert lake.copies_state(f, ref) == "MISSING"
    again = lake.request_copies(f)
    assert again is not None
    new = again.split(",")
    # the rule still there is found (DuplicateRule), the one gone made again, in the same order
    assert new[1 - gone] == ids[1 - gone] and new[gone] not in ids and len(rucio.rules) == 2
    assert [rucio.rules[r]["copies"] for r in new] == [1, 2]
    assert lake.copies_state(f, again) == "REPLICATING"


def test_register_one_rule_when_asked_so_or_for_one_copy(lake: CheckedCatalogue, rucio: FakeRucio,
                                                          tmp_path: Path) -> None:
    lake.register(lake_file(tmp_path, "reg", rel="night1/f1.fits"))
    ref = lake.request_copies(lake_file(tmp_path, "reg", rel="night1/f1.fits", copies=1))
    assert ref is not None and "," not in ref and rule_calls(rucio) == [(1, None)]
    lake.settings.rules["reg"].uplink_once = False       # each copy pulled from the buffer, as before
    lake.register(lake_file(tmp_path, "reg", name="f2", rel="night1/f2.fits"))
    ref = lake.request_copies(lake_file(tmp_path, "reg", name="f2", rel="night1/f2.fits"))
    assert ref is not None and "," not in ref and rule_calls(rucio) == [(1, None), (2, None)]
    rucio.rules[ref]["state"] = "OK"
    assert lake.copies_state(lake_file(tmp_path, "reg", name="f2"), ref) == "OK"


def test_insufficient_quota_is_permanent_with_the_rucio_message(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                tmp_path: Path) -> None:
    rucio.fail[("POST", "/rules/")] = err(409, "InsufficientAccountLimit", "there is insufficient quota on RSE X")
    with pytest.raises(PermanentError, match=r"Rucio refused POST /rules/ \(test:f1, 2 copies on lake=true\): 409 "
                                             "InsufficientAccountLimit: there is insufficient quota"):
        lake.request_copies(lake_file(tmp_path))


# ---------------------------------------------------------------- replicas (confirmation)

def registered_in_place(lake: CheckedCatalogue, rucio: FakeRucio, tmp: Path) -> LakeFile:
    f = lake_file(tmp, "reg", rel="night1/f1.fits")
    lake.register(f)
    for rse, state in (("LAKE1", "AVAILABLE"), ("LAKE2", "COPYING")):
        rucio.replicas[("test", "f1", rse)] = {"state": state, "path": None, "pfn": None}
    return f


def test_replicas_exclude_the_buffer_and_come_from_the_catalogue(make_lake: Any, rucio: FakeRucio,
                                                                 tmp_path: Path) -> None:
    lake = make_lake(verify_replicas=False)
    f = registered_in_place(lake, rucio, tmp_path)
    assert lake.replicas(f) == [
        Replica("LAKE1", 10, "0000000a", True, "root://xrd:1094//data/lake1/test/f1", adler32_from_catalogue=True),
        Replica("LAKE2", 10, "0000000a", False, "root://xrd:1094//data/lake2/test/f1", adler32_from_catalogue=True)]
    body = [b for m, p, b in rucio.calls if p == "/replicas/list"][-1]
    assert body == {"dids": [{"scope": "test", "name": "f1"}], "all_states": True, "schemes": ["root", "http"]}


def test_two_rses_over_one_storage_path_hold_one_copy(lake: CheckedCatalogue, rucio: FakeRucio,
                                                      transports: dict[str, MockTransport], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """R6 (review 2026-12-07): two RSEs whose PFNs name one object (one over root://, one over
    http://, on the same storage path) each list it AVAILABLE: it is one copy, never two."""
    f = registered_in_place(lake, rucio, tmp_path)
    rucio.replicas[("test", "f1", "LAKE2")]["state"] = "AVAILABLE"
    pfn = FakeRucio.pfn
    # LAKE2 is the same storage path as LAKE1, offered over http://
    monkeypatch.setattr(FakeRucio, "pfn", lambda self, scheme, rse, scope, name: (
        f"http://xrd:8080/data/lake1/{scope}/{name}" if rse == "LAKE2" else pfn(self, scheme, rse, scope, name)))
    for url in ("root://xrd:1094//data/lake1/test/f1", "http://xrd:8080/data/lake1/test/f1"):
        transports["root" if url.startswith("root") else "http"].lie(url, RemoteStat(10, "0000000a"))
    got = policy.judge_replicas(lake.replicas(f), 10, "0000000a")
    assert [r.location for r in got.good] == ["LAKE1"] and got.count == 1


def test_replicas_of_an_unknown_did_are_none(lake: CheckedCatalogue, tmp_path: Path) -> None:
    assert lake.replicas(lake_file(tmp_path)) == []


def test_replicas_are_verified_on_their_storage(lake: CheckedCatalogue, rucio: FakeRucio,
                                                transports: dict[str, MockTransport], tmp_path: Path) -> None:
    f = registered_in_place(lake, rucio, tmp_path)
    rucio.replicas[("test", "f1", "LAKE2")]["state"] = "AVAILABLE"
    root = transports["root"]
    root.lie("root://xrd:1094//data/lake1/test/f1", RemoteStat(10, "0000000a"))
    root.lie("root://xrd:1094//data/lake2/test/f1", RemoteStat(10, "0badbad0"))   # the storage disagrees
    assert lake.replicas(f) == [Replica("LAKE1", 10, "0000000a", True, "root://xrd:1094//data/lake1/test/f1"),
                                Replica("LAKE2", 10, "0badbad0", True, "root://xrd:1094//data/lake2/test/f1")]
    assert "root://xrd:1094//data/buf/night1/f1.fits" not in root.asked("stat")     # the buffer is never asked


def test_a_storage_without_adler32_counts_only_when_size_is_enough(make_lake: Any, rucio: FakeRucio,
                                                                   transports: dict[str, MockTransport],
                                                                   tmp_path: Path) -> None:
    transports["root"].lie("root://xrd:1094//data/lake1/test/f1", RemoteStat(10, None))
    strict = make_lake()
    f = registered_in_place(strict, rucio, tmp_path)
    assert strict.replicas(f)[0] == Replica("LAKE1", 10, None, True, "root://xrd:1094//data/lake1/test/f1")
    lenient = make_lake(verify_upload="size")
    # the agent's own registered adler32 stands in for the storage's, and the evidence says so
    assert lenient.replicas(f)[0] == Replica("LAKE1", 10, "0000000a", True, "root://xrd:1094//data/lake1/test/f1",
                                             adler32_from_catalogue=True)
    transports["root"].lie("root://xrd:1094//data/lake1/test/f1", RemoteStat(10, "0000000a"))
    assert lenient.replicas(f)[0].adler32_from_catalogue is False     # a storage that answers is asked


def test_size_only_verification_is_warned_at_start_for_each_destination(make_lake: Any) -> None:
    with capture_logs() as captured:
        make_lake()
    assert not [e for e in captured if e.get("setting") == "lake.rucio.verify_upload"]
    with capture_logs() as captured:
        make_lake(verify_upload="size")
    warned = [e for e in captured if e.get("setting") == "lake.rucio.verify_upload"]
    assert [(e["log_level"], e["destination"], e["rse"]) for e in warned] == [
        ("warning", "lake1", "LAKE1"), ("warning", "lake2", "LAKE2")]


def test_unverifiable_replicas_count_neither_way(lake: CheckedCatalogue, rucio: FakeRucio,
                                                 transports: dict[str, MockTransport], tmp_path: Path) -> None:
    f = registered_in_place(lake, rucio, tmp_path)
    # nothing on the storage: gone (a copy the agent wrote is written again)
    assert lake.replicas(f)[0] == Replica("LAKE1", None, None, True, "root://xrd:1094//data/lake1/test/f1",
                                          gone=True)
    # the storage cannot be asked now: not gone either
    transports["root"].fail("stat", times=None, error=RetryableError("xrootd: connection refused"))
    r = lake.replicas(f)[0]
    assert r.size is None and r.adler32 is None and not r.gone


def test_a_replica_without_a_transport_for_its_scheme_is_unverified(make_lake: Any, rucio: FakeRucio,
                                                                    transports: dict[str, MockTransport],
                                                                    tmp_path: Path) -> None:
    del transports["root"]
    lake = make_lake()
    f = registered_in_place(lake, rucio, tmp_path)
    # LAKE1 has an http PFN: verified over http; none of the others is available
    transports["http"].lie("http://xrd:8080/data/lake1/test/f1", RemoteStat(10, "0000000a"))
    assert lake.replicas(f)[0] == Replica("LAKE1", 10, "0000000a", True, "http://xrd:8080/data/lake1/test/f1")
    rucio.rses["LAKE1"]["schemes"] = ["root"]
    with capture_logs() as captured:
        assert lake.replicas(f)[0] == Replica("LAKE1", None, None, True, "")
    assert any("no transport" in e["event"] for e in captured)


# ---------------------------------------------------------------- release

def test_release_tombstones_the_buffer_replica_idempotently(lake: CheckedCatalogue, rucio: FakeRucio,
                                                            tmp_path: Path) -> None:
    f = registered_in_place(lake, rucio, tmp_path)
    lake.release(f)
    assert rucio.tombstoned == {("test", "f1", "BUF")}
    del rucio.replicas[("test", "f1", "BUF")]         # the reaper came by
    lake.release(f)


def test_release_of_a_locked_buffer_replica_says_why(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    f = registered_in_place(lake, rucio, tmp_path)
    rucio.locked.add(("test", "f1", "BUF"))
    with pytest.raises(PermanentError, match="a replication rule locks it .*'lake=true' match the buffer RSE"):
        lake.release(f)


def test_release_does_nothing_for_push(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    lake.release(lake_file(tmp_path))
    assert rucio.calls == []


# ---------------------------------------------------------------- health

def test_health(make_lake: Any, rucio: FakeRucio) -> None:
    lake = make_lake()
    assert lake.health() is None
    rucio.down = True
    assert lake.health() == "Rucio at http://rucio.test: connection refused (GET /ping)"
    rucio.down = False
    rucio.password = "changed"
    lake = make_lake()
    problem = lake.health()
    assert problem is not None and problem.startswith(
        "Rucio rejected the credentials of account root (userpass): 401 CannotAuthenticate")
    assert PASSWORD not in problem
    lake.close()


def test_a_refusal_to_sign_urls_makes_files_wait_and_health_say_why(make_lake: Any, rucio: FakeRucio) -> None:
    """Rucio 38 signs URLs for root only (later releases also for an account with the attribute
    sign-url): a refusal is about the account, not the file. It is retryable (files wait, never
    quarantined), health() names it until a signature succeeds."""
    from edge_agent.errors import RetryableError
    from edge_agent.lake.rucio_client import SigningRefused
    lake = make_lake()
    rucio.fail[("GET", "/credentials/signurl")] = err(401, "AccessDenied",
                                                       "Account root can not sign URLs for this RSE")
    with pytest.raises(SigningRefused) as refused:
        lake.client.signed_url("S3", "write", "https://s3.test/bucket/test/f1")
    assert isinstance(refused.value, RetryableError) and "sign-url" in str(refused.value)
    problem = lake.health()
    assert problem is not None and "refuses to sign URLs for account root (userpass) on RSE S3" in problem
    assert lake.health() == problem                  # asked again: still refused
    rucio.fail[("GET", "/credentials/signurl")] = httpx.Response(200, text="https://s3.test/bucket/test/f1?X-Amz=1")
    assert lake.health() is None                     # granted: health asked again, no file needed
    assert lake.client.signing_refused == {}
    lake.close()


def test_the_read_side_lists_what_rucio_records(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    """RucioRecords (the read side `audit` and the access API share) through the client alone."""
    lake.register(lake_file(tmp_path, rule="both"))
    lake.register(lake_file(tmp_path, rule="reg", name="f2", size=20, adler32="00000014", container="cont.n"))
    rucio.dids[("test", "bare")] = {"type": "FILE", "bytes": 5, "adler32": "00000005", "meta": {}}   # no replica
    records = RucioRecords(lake.client)
    f1 = ListedFile("test", "f1", 10, "0000000a")
    f2 = ListedFile("test", "f2", 20, "00000014")
    assert records.dataset_files("test", "ds.20261125") == [f1, f2]
    assert records.dataset_files("test", "cont.n") == [f1, f2]            # a container: its datasets' files
    with pytest.raises(UnknownDid, match="DataIdentifierNotFound"):
        records.dataset_files("test", "nothing")
    found = records.lookup([("test", "f1"), ("test", "f2"), ("test", "bare"), ("test", "nope")])
    md5 = "0123456789abcdef0123456789abcdef"
    assert found == {
        ("test", "f1"): ListedFile("test", "f1", 10, "0000000a", md5,
                                   (ListedReplica("LAKE1", "COPYING", ("http://xrd:8080/data/lake1/test/f1",)),)),
        ("test", "f2"): ListedFile("test", "f2", 20, "00000014", md5,
                                   (ListedReplica("BUF", "AVAILABLE", ("root://xrd:1094//data/buf/run42/f1.fits",)),)),
        ("test", "bare"): ListedFile("test", "bare", 5, "00000005")}
    assert records.lookup([("test", "f1")], schemes=["root"])[("test", "f1")].replicas == (
        ListedReplica("LAKE1", "COPYING", ("root://xrd:1094//data/lake1/test/f1",)),)
    body = [b for m, p, b in rucio.calls if p == "/replicas/list"][-1]
    assert body["schemes"] == ["root"]


# ---------------------------------------------------------------- batches
def batch(tmp: Path, n: int, rule: str = "push") -> list[LakeFile]:
    return [lake_file(tmp, rule=rule, name=f"b{i}", rel=f"run42/b{i}.fits", size=10 + i, adler32=f"{10 + i:08x}")
            for i in range(n)]


def test_a_batch_is_registered_in_bulk_calls(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    files = batch(tmp_path, 6)
    before = len(rucio.calls)
    assert lake.register_many(files) == [None] * 6
    calls = [(m, p) for m, p, _ in rucio.calls[before:] if p != "/auth/userpass"]
    # look, add the replicas, look again, make the dataset, attach: whatever the batch's size
    assert calls == [("POST", "/dids/bulkmeta"), ("POST", "/replicas"), ("POST", "/dids/bulkmeta"),
                     ("POST", "/dids/test/ds.20261125"), ("POST", "/dids/attachments")]
    for f in files:
        assert rucio.dids[("test", f.name)]["bytes"] == f.size
        assert ("test", f.name, "LAKE1") in rucio.replicas
        assert ("test", "ds.20261125", "test", f.name) in rucio.contents
    assert lake.register_many(files) == [None] * 6          # again (a batch repeated after a crash)


def test_a_file_whose_name_holds_other_content_fails_alone(lake: CheckedCatalogue, rucio: FakeRucio,
                                                           tmp_path: Path) -> None:
    files = batch(tmp_path, 5)
    rucio.dids[("test", "b2")] = {"type": "FILE", "bytes": 999, "adler32": "deadbeef", "meta": {}}
    out = lake.register_many(files)
    assert [o is None for o in out] == [True, True, False, True, True]
    assert isinstance(out[2], PermanentError) and "other content" in str(out[2])
    assert ("test", "b2", "LAKE1") not in rucio.replicas                 # no replica row on other bytes
    assert ("test", "ds.20261125", "test", "b2") not in rucio.contents
    assert all(("test", "ds.20261125", "test", f.name) in rucio.contents for i, f in enumerate(files) if i != 2)


def test_a_bulk_call_refused_whole_is_narrowed_to_the_file_at_fault(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                    tmp_path: Path) -> None:
    files = batch(tmp_path, 7)
    rucio.refuse_attach = {"b5"}
    out = lake.register_many(files)
    assert [o is None for o in out] == [True, True, True, True, True, False, True]
    assert isinstance(out[5], PermanentError)
    attached = {cn for s, n, cs, cn in rucio.contents if n == "ds.20261125"}
    assert attached == {f.name for f in files} - {"b5"}


def test_a_bulk_call_that_may_pass_later_fails_every_file_for_a_retry(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                       tmp_path: Path) -> None:
    rucio.fail[("POST", "/replicas")] = err(503, "DatabaseException", "too many requests")
    out = lake.register_many(batch(tmp_path, 3))
    assert all(isinstance(o, RetryableError) for o in out)


def test_a_batch_s_replicas_and_rules_are_asked_once(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    files = batch(tmp_path, 4)
    assert lake.register_many(files) == [None] * 4
    before = len(rucio.calls)
    recorded = lake.recorded_many(files)
    assert [len(r) for r in recorded] == [1, 1, 1, 1] and all(r[0].location == "LAKE1" for r in recorded)
    assert [p for _, p, _ in rucio.calls[before:]] == ["/replicas/list"]
    refs = lake.request_copies_many(files)
    ref = refs[0]
    assert refs == [ref] * 4 and isinstance(ref, str)      # one rule for the batch
    before = len(rucio.calls)
    states = lake.copies_states([(f, ref) for f in files] + [(files[0], None)])
    assert states[:4] == [states[0]] * 4 and states[4] is None
    assert [p for _, p, _ in rucio.calls[before:]] == [f"/rules/{ref}", f"/rules/{ref}/locks"]


def test_a_files_urls_are_asked_of_rucio_once(lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    f = lake_file(tmp_path, rule="both")
    first = lake.targets(f)
    asked = rucio.count("GET", "/rses/LAKE1/lfns2pfns") + rucio.count("GET", "/rses/LAKE2/lfns2pfns")
    assert lake.targets(f) == first                    # the other copies, the naming checks: no new question
    assert rucio.count("GET", "/rses/LAKE1/lfns2pfns") + rucio.count("GET", "/rses/LAKE2/lfns2pfns") == asked == 2


def test_a_batch_s_copies_are_recorded_in_few_calls_per_rse(lake: CheckedCatalogue, rucio: FakeRucio,
                                                             tmp_path: Path) -> None:
    """The registered RSE's COPYING replicas are set AVAILABLE (PUT alone); the other RSE's are added
    (POST) and set AVAILABLE (PUT): the POST leaves a replica that existed already as it was."""
    files = batch(tmp_path, 4, rule="both")
    assert lake.register_many(files) == [None] * 4           # LAKE1's replicas COPYING
    before = len(rucio.calls)
    copies = [(f, rse, rucio.pfn("http", rse, f.scope, f.name)) for f in files for rse in ("LAKE1", "LAKE2")]
    assert lake.add_replicas_many(copies) == [None] * 8
    assert [(m, p, b["rse"]) for m, p, b in rucio.calls[before:]] == [
        ("PUT", "/replicas", "LAKE1"), ("POST", "/replicas", "LAKE2"), ("PUT", "/replicas", "LAKE2")]
    assert all(rucio.replicas[("test", f.name, rse)]["state"] == "AVAILABLE" for f in files for rse in ("LAKE1", "LAKE2"))
    assert lake.add_replicas_many(copies) == [None] * 8       # again, after a crash


def test_a_registered_replica_removed_meanwhile_is_added_again(lake: CheckedCatalogue, rucio: FakeRucio,
                                                               tmp_path: Path) -> None:
    files = batch(tmp_path, 3, rule="both")
    assert lake.register_many(files) == [None] * 3
    del rucio.replicas[("test", files[1].name, "LAKE1")]
    copies = [(f, "LAKE1", rucio.pfn("http", "LAKE1", f.scope, f.name)) for f in files]
    assert lake.add_replicas_many(copies) == [None] * 3
    assert all(rucio.replicas[("test", f.name, "LAKE1")]["state"] == "AVAILABLE" for f in files)


@pytest.mark.parametrize("state", ["COPYING", "UNAVAILABLE", "BAD"])
def test_a_replica_that_existed_on_another_rse_is_recorded_available_after_the_agent_s_copy(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path, state: str) -> None:
    """Review: POST /replicas leaves an existing replica as it was (one a rule made COPYING, one the
    lake declared bad): the agent's checked copy, written just now, is recorded AVAILABLE all the same."""
    files = batch(tmp_path, 2, rule="both")
    assert lake.register_many(files) == [None] * 2
    rucio.replicas[("test", files[0].name, "LAKE2")] = {"state": state, "path": None, "pfn": None}
    copies = [(f, rse, rucio.pfn("http", rse, f.scope, f.name)) for f in files for rse in ("LAKE1", "LAKE2")]
    assert lake.add_replicas_many(copies) == [None] * 4
    assert all(rucio.replicas[("test", f.name, rse)]["state"] == "AVAILABLE" for f in files for rse in ("LAKE1", "LAKE2"))


def test_a_batch_s_rules_are_asked_in_one_call_and_a_rule_that_exists_is_found(lake: CheckedCatalogue,
                                                                               rucio: FakeRucio,
                                                                               tmp_path: Path) -> None:
    lake.settings.rules["push"].rule_per = "file"
    files = batch(tmp_path, 5)
    assert lake.register_many(files) == [None] * 5
    existing = lake.request_copies(files[3])                   # asked before a crash
    before = len(rucio.calls)
    refs = lake.request_copies_many(files)
    assert all(isinstance(r, str) for r in refs) and len(set(refs)) == 5 and refs[3] == existing
    rules = [(m, p) for m, p, _ in rucio.calls[before:] if p == "/rules/"]
    assert len(rules) < 5 + 3                                  # narrowed by halves, not asked file by file twice
    assert {(r["scope"], r["name"]) for r in rucio.rules.values()} == {("test", f.name) for f in files}
    assert len(rucio.rules) == 5                               # one rule each, none twice
    before = len(rucio.calls)
    assert lake.request_copies_many(files[:3]) == refs[:3]     # again: the same rules


def test_a_destination_written_over_http_is_verified_over_http(rucio: FakeRucio, transports: dict[str, MockTransport],
                                                               tmp_path: Path) -> None:
    """lake.rucio.schemes puts root before http; lake1 is written over http (its `scheme`): its copy
    is asked of the storage over http too, not by a root:// query."""
    s = make_settings(tmp_path)
    s.destinations["lake1"].scheme = "http"
    assert s.lake.rucio is not None
    client = RucioClient(s.lake.rucio, transport=httpx.MockTransport(rucio), sleep=lambda t: None)
    lake = CheckedCatalogue(s, dict(transports), client)
    f = registered_in_place(lake, rucio, tmp_path)
    rucio.replicas[("test", "f1", "LAKE2")]["state"] = "AVAILABLE"
    [lake1, lake2] = lake.recorded(f)
    assert lake1.url == "http://xrd:8080/data/lake1/test/f1"              # its own scheme
    assert lake2.url == "root://xrd:1094//data/lake2/test/f1"             # scheme root, as configured


def test_two_files_of_one_batch_sharing_a_name_go_through(lake: CheckedCatalogue, rucio: FakeRucio,
                                                          tmp_path: Path) -> None:
    """Two paths with the same bytes share one name, and one batch may hold both: each bulk call
    names the DID once (Rucio refuses a new DID named twice in one call, as a 500 that would be
    retried for ever)."""
    files = batch(tmp_path, 3, rule="both")
    twin = dataclasses.replace(files[1], local_path=str(tmp_path / "daq2" / "run43" / "b1.fits"))
    both = [*files, twin]
    assert lake.register_many(both) == [None] * 4
    copies = [(f, rse, rucio.pfn("http", rse, f.scope, f.name)) for f in both for rse in ("LAKE1", "LAKE2")]
    assert lake.add_replicas_many(copies) == [None] * 8
    lake.settings.rules["both"].rule_per = "file"
    refs = lake.request_copies_many(both)
    assert all(isinstance(r, str) for r in refs) and refs[1] == refs[3] and len(rucio.rules) == 3


# ---------------------------------------------------------------- one rule per batch (rule_per = "batch")

def recorded_batch(lake: CheckedCatalogue, rucio: FakeRucio, tmp: Path, n: int) -> list[LakeFile]:
    """n files of rule `both`, registered, with both copies AVAILABLE (as the record step leaves them)."""
    files = batch(tmp, n, rule="both")
    assert lake.register_many(files) == [None] * n
    copies = [(f, rse, rucio.pfn("http", rse, f.scope, f.name)) for f in files for rse in ("LAKE1", "LAKE2")]
    assert lake.add_replicas_many(copies) == [None] * 2 * n
    return files


def test_a_batch_gets_one_rule_on_a_closed_dataset_of_exactly_its_files(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                         tmp_path: Path) -> None:
    files = recorded_batch(lake, rucio, tmp_path, 5)
    refs = lake.request_copies_many(files)
    assert len(set(refs)) == 1 and isinstance(refs[0], str) and len(rucio.rules) == 1
    rule = rucio.rules[refs[0]]
    ds = rule["name"]
    assert ds == rucio_rules.dataset_name(files[0].dataset, [(f.scope, f.name) for f in files])
    assert ds.startswith(f"{files[0].dataset}.rule-")
    assert rucio.dids[("test", ds)]["open"] is False                  # nothing can be attached later
    assert {(cs, cn) for s, n, cs, cn in rucio.contents if n == ds} == {("test", f.name) for f in files}
    assert (rule["copies"], rule["rse_expression"], rule["body"]["grouping"]) == (2, "LAKE1|LAKE2", "DATASET")
    assert lake.copies_states([(f, refs[0]) for f in files]) == [CopiesState.OK] * 5


def test_a_batch_asked_again_after_a_crash_finds_its_dataset_and_rule(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                      tmp_path: Path) -> None:
    files = recorded_batch(lake, rucio, tmp_path, 4)
    first = lake.request_copies_many(files)
    again = lake.request_copies_many(list(reversed(files)))           # the dataset is closed by now
    assert again == first[::-1] and len(rucio.rules) == 1
    # a crash between the attachment and the rule: the open dataset is reused, the rule made once
    others = recorded_batch(lake, rucio, tmp_path / "other", 3)
    ds = rucio_rules.dataset_name(others[0].dataset, [(f.scope, f.name) for f in others])
    assert ds is not None
    rucio.dids[("test", ds)] = {"type": "DATASET", "meta": {}, "open": True}
    rucio.contents.add(("test", ds, "test", others[0].name))
    refs = lake.request_copies_many(others)
    assert len(set(refs)) == 1 and len(rucio.rules) == 2 and rucio.dids[("test", ds)]["open"] is False


def test_files_of_a_batch_rule_are_confirmed_by_their_own_locks(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                 tmp_path: Path) -> None:
    files = recorded_batch(lake, rucio, tmp_path, 4)
    ref = lake.request_copies_many(files)[0]
    assert isinstance(ref, str)
    rucio.lock_states[(files[1].name, "LAKE2")] = "STUCK"
    rucio.replicas[("test", files[2].name, "LAKE2")]["state"] = "COPYING"
    stray = lake_file(tmp_path, rule="both", name="stray")         # the rule does not lock it
    states = lake.copies_states([(f, ref) for f in [*files, stray]])
    assert states == [CopiesState.OK, CopiesState.STUCK, CopiesState.REPLICATING, CopiesState.OK,
                      CopiesState.MISSING]
    rucio.rules[ref]["state"] = "SUSPENDED"
    assert set(lake.copies_states([(f, ref) for f in files])) == {CopiesState.SUSPENDED}
    del rucio.rules[ref]
    assert set(lake.copies_states([(f, ref) for f in files])) == {CopiesState.MISSING}


def test_a_batch_rule_rucio_refuses_becomes_rules_per_file(lake: CheckedCatalogue, rucio: FakeRucio,
                                                           tmp_path: Path) -> None:
    files = recorded_batch(lake, rucio, tmp_path, 4)
    ds = rucio_rules.dataset_name(files[0].dataset, [(f.scope, f.name) for f in files])
    rucio.fail[("POST", f"/dids/test/{ds}")] = err(400, "InvalidObject", "Problem validating the name")
    refs = lake.request_copies_many(files)
    assert all(isinstance(r, str) for r in refs) and len(set(refs)) == 4
    assert {(r["scope"], r["name"]) for r in rucio.rules.values()} == {("test", f.name) for f in files}


def test_a_batch_rule_rucio_cannot_make_now_is_every_file_s_retry(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                  tmp_path: Path) -> None:
    files = recorded_batch(lake, rucio, tmp_path, 3)
    rucio.fail[("POST", "/rules/")] = err(503, "ServiceUnavailable", "try later")
    refs = lake.request_copies_many(files)
    assert all(isinstance(r, RetryableError) for r in refs) and not rucio.rules


def test_a_batch_rule_covers_at_most_what_rucio_makes_at_once() -> None:
    assert rucio_rules.files_per_rule(1) == 1000 and rucio_rules.files_per_rule(2) == 1000
    assert rucio_rules.files_per_rule(16) == 624 and 624 * 16 < rucio_rules.ASYNC_LOCKS
    dids = [("test", "a"), ("test", "b")]
    assert rucio_rules.dataset_name("ds", dids) == rucio_rules.dataset_name("ds", dids[::-1] + dids)
    assert rucio_rules.dataset_name("ds", dids) != rucio_rules.dataset_name("ds", dids[:1])
    assert rucio_rules.dataset_name("x" * 240, dids) is None             # longer than Rucio's names
    assert rucio_rules.dataset_name(None, dids).startswith("edge-agent.rule-")


def test_a_batch_asked_again_with_other_files_keeps_its_planned_dataset_and_rule(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: a crash between the rule and the ledger's commit, then a repeat whose batch holds other
    files (one failed meanwhile, one joined). The dataset each file was planned on (kept in the ledger
    before anything was asked) is used again: every file ends locked by one rule, no batch dataset
    is left open."""
    files = recorded_batch(lake, rucio, tmp_path, 4)
    first, late = files[:3], files[3]
    plans = lake.plan_copies(first, [None] * 3)
    assert len(set(plans)) == 1 and str(plans[0]).startswith(rucio_rules.PLANNED)

    def killed(*a: Any, **k: Any) -> None:
        raise RetryableError("kill -9")
    monkeypatch.setattr(lake.client, "close_did", killed)
    assert all(isinstance(x, RetryableError) for x in lake.request_copies_many(first, plans))
    monkeypatch.undo()
    # the repeat: f0 and f1 come back with their plan, f2 failed meanwhile, f3 joins
    again = [first[0], first[1], late]
    plans2 = lake.plan_copies(again, [plans[0], plans[1], None])
    assert plans2[:2] == plans[:2] and plans2[2] == rucio_rules.PLANNED_ALONE   # one new file: a rule of its own
    refs = lake.request_copies_many(again, plans2)
    assert refs[0] == refs[1] and isinstance(refs[0], str) and isinstance(refs[2], str) and refs[2] != refs[0]
    # f2 comes back later, alone, with its plan: the same dataset and rule
    assert lake.request_copies_many([first[2]], [plans[2]]) == [refs[0]]
    for f in files:
        covering = [rid for rid, r in rucio.rules.items()
                    if (r["scope"], r["name"]) == (f.scope, f.name) or (f.scope, f.name) in r.get("files", [])]
        assert len(covering) == 1, (f.name, covering)
    assert not [n for (_, n), d in rucio.dids.items() if ".rule-" in n and d["open"]]


def test_a_file_that_was_asked_a_rule_before_keeps_it(lake: CheckedCatalogue, rucio: FakeRucio,
                                                       tmp_path: Path) -> None:
    """A file recorded again (a lost copy written again) keeps the rule it has: nothing is asked."""
    files = recorded_batch(lake, rucio, tmp_path, 2)
    refs = lake.request_copies_many(files)
    before = len(rucio.calls)
    assert lake.plan_copies(files, refs) == refs
    assert lake.request_copies_many(files, refs) == refs and len(rucio.calls) == before


def test_a_file_planned_alone_keeps_a_rule_of_its_own_when_asked_again_with_others(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    """Found on the real lake: a batch of one file got a rule on the file, the crash came before the
    commit, and the repeat put it in a batch with others: a second rule. Its plan is kept too."""
    files = recorded_batch(lake, rucio, tmp_path, 3)
    plan = lake.plan_copies(files[:1], [None])
    assert plan == [rucio_rules.PLANNED_ALONE]
    first = lake.request_copies_many(files[:1], plan)                # then: killed before the commit
    plans = lake.plan_copies(files, [plan[0], None, None])
    assert plans[0] == rucio_rules.PLANNED_ALONE and plans[1] == plans[2] != plans[0]
    refs = lake.request_copies_many(files, plans)
    assert refs[0] == first[0] and refs[1] == refs[2] != refs[0]
    for f in files:
        covering = [rid for rid, r in rucio.rules.items()
                    if (r["scope"], r["name"]) == (f.scope, f.name) or (f.scope, f.name) in r.get("files", [])]
        assert len(covering) == 1, (f.name, covering)



def covering_rules(rucio: FakeRucio, f: LakeFile) -> list[str]:
    return [rid for rid, r in rucio.rules.items()
            if (r["scope"], r["name"]) == (f.scope, f.name) or (f.scope, f.name) in r.get("files", [])]


def test_a_batch_rule_refused_leaves_no_file_of_it_in_its_dataset(lake: CheckedCatalogue, rucio: FakeRucio,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the rule on a batch's dataset is refused (a quota, say), its files fall back to rules
    of their own, one is refused too and kept with its plan; asked again later on the dataset, its
    rule must not lock the others a second time: they were detached when the rule was refused."""
    a, b, c = recorded_batch(lake, rucio, tmp_path, 3)
    plans = lake.plan_copies([a, b, c], [None] * 3)
    ds = str(plans[0])[len(rucio_rules.PLANNED):]
    add_rule, add_rules = lake.client.add_rule, lake.client.add_rules
    quota = {"full": True}

    def limited_rule(scope: str, name: str, *args: Any, **kw: Any) -> str:
        if quota["full"] and name in (ds, c.name):
            raise RucioPermanent("InsufficientAccountLimit", 409, "InsufficientAccountLimit")
        return add_rule(scope, name, *args, **kw)

    def limited_rules(dids: Any, *args: Any, **kw: Any) -> list[str]:
        if quota["full"] and (c.scope, c.name) in dids:
            raise RucioPermanent("InsufficientAccountLimit", 409, "InsufficientAccountLimit")
        return add_rules(dids, *args, **kw)
    monkeypatch.setattr(lake.client, "add_rule", limited_rule)
    monkeypatch.setattr(lake.client, "add_rules", limited_rules)
    refs = lake.request_copies_many([a, b, c], plans)
    assert isinstance(refs[0], str) and isinstance(refs[1], str) and isinstance(refs[2], PermanentError)
    assert not [n for (_, n, _, _) in rucio.contents if n == ds]            # detached
    quota["full"] = False                                                   # the quota is raised; c retried
    again = lake.request_copies_many([c], lake.plan_copies([c], [plans[2]]))
    assert isinstance(again[0], str)
    assert [len(covering_rules(rucio, f)) for f in (a, b, c)] == [1, 1, 1]


def test_a_file_planned_on_a_dataset_closed_without_it_gets_a_rule_of_its_own(
        lake: CheckedCatalogue, rucio: FakeRucio, tmp_path: Path) -> None:
    """Review: killed right after the plan's commit; two of the three files come back first and
    their dataset is made and closed with them alone. The third, asked later on it, is not told
    that dataset's rule (which cannot lock it): it gets a rule of its own."""
    a, b, c = recorded_batch(lake, rucio, tmp_path, 3)
    plans = lake.plan_copies([a, b, c], [None] * 3)
    first = lake.request_copies_many([a, b], plans[:2])
    late = lake.request_copies_many([c], plans[2:])
    assert isinstance(late[0], str) and late[0] != first[0]
    assert rucio.rules[late[0]]["name"] == c.name                          # on the file itself
    assert lake.copies_state(c, late[0]) is not CopiesState.MISSING
    assert [len(covering_rules(rucio, f)) for f in (a, b, c)] == [1, 1, 1]
