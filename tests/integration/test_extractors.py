"""Extractors in the real daemon: a command and an entry point (registered as an installed package
would be) both add metadata that the lake's catalogue then holds; a failing one quarantines with its
stderr, and `edge-agent retry` sends the file once the program is fixed. On the local lake, and on
the real Rucio lake (the DID's metadata read back through Rucio's REST API)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from plugins import install_extractor_plugins
from support import Daemon

pytestmark = [pytest.mark.integration]

GOOD = ("import json, sys\ndata = open(sys.argv[-1], 'rb').read()\n"
        "print(json.dumps({'frames': data.count(b'\\n'), 'run': int(sys.argv[1]), 'origin': 'daq-meta'}))\n")
BAD = "import sys\nprint('daq-meta: no frame header in', sys.argv[-1], file=sys.stderr)\nsys.exit(3)\n"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's plug-ins, on the PYTHONPATH of every daemon and CLI call the test starts."""
    path = install_extractor_plugins(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(path), os.environ.get("PYTHONPATH")) if p))
    return path


def program(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def extractor_rules(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Three rules: a command, an entry point that takes the stream, a command that fails."""
    good = program(tmp_path, "daq-meta.py", GOOD)
    bad = program(tmp_path, "daq-meta-bad.py", BAD)
    rules: dict[str, dict[str, Any]] = {
        "cmd": {"extractor": {"command": [sys.executable, str(good), "42"]}, "metadata": {"site": "ORM"}},
        "ep": {"extractor": {"entry_point": "linecount"}},
        "bad": {"extractor": {"command": [sys.executable, str(bad)], "timeout_seconds": 20}}}
    for name, r in rules.items():
        r["name_template"] = f"{name}/{{filename}}"
    return rules


def publish(d: Daemon, rule: str, name: str, data: bytes) -> None:
    tmp = d.rule_dir(rule) / (name + ".part")
    tmp.write_bytes(data)
    os.rename(tmp, d.rule_dir(rule) / name)


DATA = b"frame\n" * 5000


def check_quarantine_then_retry(d: Daemon, rule: str, bad_program: Path) -> dict[str, Any]:
    """The failing rule's file is quarantined with the program's stderr; fixed, it is sent on retry.
    Returns its ledger record afterwards."""
    d.wait_for(lambda: d.counts(rule).get("quarantined") == 1, 60, "the failing extractor's file quarantined")
    [rec] = [f for f in d.files() if f["rule"] == rule]
    assert rec["reason"].startswith(f"extractor {os.path.basename(sys.executable)} failed on f1.dat: exit status 3; "
                                    f"stderr: daq-meta: no frame header in {rec['path']}"), rec["reason"]
    assert f"`edge-agent retry {rec['id']}`" in rec["reason"]
    assert os.path.exists(rec["path"])
    bad_program.write_text(GOOD.replace("int(sys.argv[1])", "7"))
    assert d.cli("retry", str(rec["id"])).returncode == 0
    d.wait_for(lambda: d.counts(rule).get("deleted") == 1, 60, "the file sent once the extractor is fixed")
    return next(f for f in d.files() if f["rule"] == rule)


def test_extractors_add_metadata_to_the_local_lake_and_a_failing_one_quarantines(
        agent: Any, tmp_path: Path, site: Path) -> None:
    d = agent(rules=extractor_rules(tmp_path), destinations=("lake1",))
    d.start()
    for rule in ("cmd", "ep", "bad"):
        publish(d, rule, "f1.dat", DATA)
    for rule in ("cmd", "ep"):
        d.wait_for(lambda r=rule: d.counts(r).get("deleted") == 1, 60, f"rule {rule}'s file delivered")
    by_rule = {f["rule"]: f for f in d.files()}
    assert by_rule["cmd"]["metadata"] == {"site": "ORM", "frames": 5000, "run": 42, "origin": "daq-meta"}
    assert by_rule["ep"]["metadata"] == {"lines": 5000, "bytes_counted": len(DATA)}
    fixed = check_quarantine_then_retry(d, "bad", tmp_path / "daq-meta-bad.py")
    assert fixed["metadata"] == {"frames": 5000, "run": 7, "origin": "daq-meta"}
    # what the catalogue holds for each DID is what the ledger recorded
    with sqlite3.connect(d.state / "lake-catalog.sqlite") as db:
        held = {(s, n): json.loads(m) for s, n, m in db.execute("SELECT scope, name, meta FROM dids WHERE meta IS NOT NULL")}
    for f in d.files():
        assert held[(f["scope"], f["name"])] == f["metadata"], f["rule"]
    assert d.stop() == 0


@pytest.mark.lake
@pytest.mark.rucio_server
def test_extractors_add_metadata_that_rucio_holds_and_a_failing_one_quarantines(
        agent: Any, lake: Any, tmp_path: Path, site: Path) -> None:
    from .test_rucio_lake import rucio_agent, uid
    u = uid()
    rules = {name: {**r, "copies": 1, "name_template": f"{u}.{name}.{{filename}}", "dataset_template": f"{u}.night"}
             for name, r in extractor_rules(tmp_path).items()}
    d = rucio_agent(agent, lake, rules)
    d.start()
    for rule in ("cmd", "ep", "bad"):
        publish(d, rule, "f1.dat", DATA)
    for rule in ("cmd", "ep"):
        d.wait_for(lambda r=rule: d.counts(r).get("deleted") == 1, 90, f"rule {rule}'s file delivered")

    def in_rucio(rule: str) -> dict[str, Any]:
        meta: dict[str, Any] = lake.call("GET", f"/dids/{lake.scope}/{u}.{rule}.f1.dat/meta?plugin=ALL").json()
        return meta

    cmd, ep = in_rucio("cmd"), in_rucio("ep")
    assert (cmd["site"], cmd["frames"], cmd["run"], cmd["origin"]) == ("ORM", 5000, 42, "daq-meta")
    assert (ep["lines"], ep["bytes_counted"]) == (5000, len(DATA))
    assert cmd["bytes"] == len(DATA)           # the DID's own columns are the agent's, untouched
    fixed = check_quarantine_then_retry(d, "bad", tmp_path / "daq-meta-bad.py")
    assert fixed["metadata"] == {"frames": 5000, "run": 7, "origin": "daq-meta"}
    assert in_rucio("bad")["run"] == 7
    assert d.stop() == 0
