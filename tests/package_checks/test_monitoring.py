"""The Prometheus alert rules (packaging/monitoring): valid, unit-tested with promtool, and written
against the metrics a running agent really exports, so that code and rules cannot drift apart."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import Daemon

from .pkgtools import PACKAGING, run

pytestmark = pytest.mark.packaging

MONITORING = PACKAGING / "monitoring"
RULES = MONITORING / "edge-agent.rules.yml"
RULE_TESTS = MONITORING / "edge-agent.rules.test.yml"
MONITORING_DOC = PACKAGING.parent / "docs" / "monitoring.md"
ALERTS = {"EdgeAgentDown", "EdgeAgentBacklogGrowing", "EdgeAgentOldestUnconfirmedTooOld",
          "EdgeAgentBufferAboveWatermark", "EdgeAgentLakeUnreachable", "EdgeAgentQuarantinedFiles",
          "EdgeAgentAttention", "EdgeAgentFleetAgentSilent", "EdgeAgentNoDataWhileExpected",
          "EdgeAgentDataOutsideExpectedTime", "EdgeAgentInputRateLow",
          "EdgeAgentNightOverdue"}
# Debian's promtool, unpacked from the prometheus .deb (19 MB) rather than installed (332 MB with
# its dependencies); kept between runs
PROMTOOL_CACHE = Path("/var/tmp/edge-agent-promtool")


@pytest.fixture(scope="module")
def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    cached = PROMTOOL_CACHE / "root" / "usr" / "bin" / "promtool"
    if cached.exists():
        return cached
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("promtool is missing and apt-get/dpkg-deb are not there to fetch Debian's")
    PROMTOOL_CACHE.mkdir(parents=True, exist_ok=True)
    work = PROMTOOL_CACHE / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    get = ["apt-get", "download", "prometheus"]
    if subprocess.run(get, cwd=work, capture_output=True, timeout=300, check=False).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q"], capture_output=True, timeout=900,
                       check=False)
        p = subprocess.run(get, cwd=work, capture_output=True, text=True, timeout=300, check=False)
        if p.returncode != 0:
            pytest.skip(f"cannot download Debian's prometheus package for promtool: {p.stderr[-500:]}")
    debs = list(work.glob("prometheus_*.deb"))
    assert len(debs) == 1, debs
    run(["dpkg-deb", "-x", debs[0], work / "root"])
    (work / "root").rename(PROMTOOL_CACHE / "root")   # whole or not at all
    return cached


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_accepts_the_rules(promtool: Path) -> None:
    out = run([promtool, "check", "rules", RULES]).stdout
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_promtool_unit_tests_of_the_rules_pass(promtool: Path) -> None:
    out = run([promtool, "test", "rules", RULE_TESTS]).stdout
    assert "SUCCESS" in out


def test_every_alert_is_named_documented_and_tested_both_ways() -> None:
    rs = rules()
    assert {r["alert"] for r in rs} == ALERTS
    for r in rs:
        name = r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        # docs/runbook.md has one section per alert; its anchor is the lowercase alert name
        assert r["annotations"]["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in ALERTS:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The agent's metrics an expression reads, with their equality matchers."""
    out = []
    for name, matchers in re.findall(r"\b(edge_agent_[a-z0-9_]+)(\{[^}]*\})?", expr):
        labels = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers or ""))
        out.append((name, labels))
    return out


def test_the_rules_read_only_metrics_and_labels_a_running_agent_exports(tmp_path: Path) -> None:
    # a shared ledger (named: SQLite), so that the fleet's series are exported too
    # and a rule with an observing schedule, so that its alarms are exported too
    d = Daemon(tmp_path / "agent", ledger={"agent_id": "monitoring-test"},
               rules={"daq": {"completion": ["renamed"], "expected": {"hours": ["00:00-23:59"]}}})
    d.start()
    try:
        (d.rule_dir() / "empty.fits").write_bytes(b"")           # quarantined: a labelled series exists
        d.wait_for(lambda: d.counts().get("quarantined") == 1, 30, "the empty file quarantined")
        d.wait_for(lambda: b"edge_agent_buffer_used_ratio{" in d.get("/metrics")[1], 30, "a disk sample")
        assert b'edge_agent_fleet_claims{agent="monitoring-test"}' in d.get("/metrics")[1]
        code, body = d.get("/metrics")
    finally:
        d.stop()
    assert code == 200
    exported: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            exported.setdefault(s.name, []).append(s.labels)

    used = 0
    for r in rules():
        sels = selectors(r["expr"])
        used += len(sels)
        for name, matchers in sels:
            assert name in exported, f"{r['alert']}: {name} is not exported by the agent"
            assert any(matchers.items() <= labels.items() for labels in exported[name]), \
                f"{r['alert']}: no {name} series with {matchers}"
        # what the annotations print must be a label the series carry (Prometheus adds instance, job)
        wanted = set(re.findall(r"\$labels\.(\w+)", str(r["annotations"]))) - {"instance", "job"}
        for name, _ in sels:
            for label in wanted:
                assert all(label in labels for labels in exported[name]), \
                    f"{r['alert']}: prints $labels.{label}, which {name} does not have"
    assert used >= len(ALERTS) - 1          # every alert but EdgeAgentDown (`up`) reads the agent's metrics

    # and the operators' page lists every family the agent exports, so docs cannot fall behind
    documented = set(re.findall(r"^\| `(edge_agent_\w+)`", MONITORING_DOC.read_text(), re.M))
    families = {re.sub(r"_(total|created)$", "", n) for n in exported if n.startswith("edge_agent_")}
    assert families - documented == set(), "exported but missing from docs/monitoring.md"

