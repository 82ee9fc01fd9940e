"""The observatory configs in conf/: each one passes the real `edge-agent check-config` as
shipped (paths need not exist for validation; no file is edited or substituted), and each
keeps the policy its comments promise, read back through the settings object."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import ROOT

from edge_agent.core import policy
from edge_agent.settings import DeletePolicy, Settings, load_settings

CONF = ROOT / "conf"
# The environment of the agent under test: nothing of the CI host's EDGE_AGENT_* variables.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
LSST_BYTES_PER_DAY = 20e12


def check_config(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", str(path)], cwd=ROOT,
                          env=CLEAN_ENV, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{path.name}: check-config exited {proc.returncode}\n{proc.stderr}"
    header, _, body = proc.stdout.partition("\n")
    assert "valid" in header, header
    return json.loads(body)


def load(name: str) -> Settings:
    old = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("EDGE_AGENT_")}
    try:
        return load_settings(CONF / name)
    finally:
        os.environ.update(old)


def average_cap(s: Settings) -> float:
    """Bytes/s the bandwidth cap allows, averaged over the 1440 minutes of a day."""
    windows = s.windows_policy()
    caps = [policy.bandwidth_cap(dt.time(m // 60, m % 60), s.bandwidth_mbps, windows) for m in range(1440)]
    return sum(caps) / len(caps)


def local_policy(s: Settings) -> None:
    assert s.lake.kind == "local" and not s.dry_run
    for rule in s.rules.values():
        assert rule.inject == "push" and rule.delete is DeletePolicy.AFTER_CONFIRM
        assert rule.copies == len(rule.destinations) >= 2
        for d in rule.destinations:
            dest = s.destinations[d]
            assert dest.kind == "posix" and dest.require_file, f"{d}: guard against an unmounted lake"
            assert dest.verify == "reread"


def magic_policy(s: Settings) -> None:
    assert s.lake.kind == "rucio" and s.lake.rucio is not None and not s.dry_run
    assert {"m1", "m2"} <= set(s.rules)
    for name, rule in s.rules.items():
        assert rule.inject == "register", name
        assert rule.buffer_rse and rule.buffer_url and rule.rse_expression
        assert rule.buffer_url.rstrip("/").endswith(str(rule.directory)), "buffer_url names the buffer"
        assert rule.copies == 2 and rule.delete is DeletePolicy.AFTER_CONFIRM
        assert rule.timezone == "Atlantic/Canary"
    assert s.lake.rucio.auth.type == "x509" and s.lake.rucio.verify_replicas


def lsst_policy(s: Settings) -> None:
    assert s.lake.kind == "rucio" and s.lake.rucio is not None and not s.dry_run
    (rule,) = s.rules.values()
    assert rule.inject == "push" and rule.destinations and rule.copies == 2
    assert all(s.destinations[d].kind == "rse" for d in rule.destinations)
    assert rule.delete is DeletePolicy.KEEP and rule.keep_hours >= 24
    assert s.bandwidth_mbps > 0, "a bandwidth cap"
    need = LSST_BYTES_PER_DAY / 86400
    # The cap is real (not unlimited) at every minute, and on average leaves room to catch up.
    assert average_cap(s) < float("inf")
    assert average_cap(s) >= 1.2 * need, f"{average_cap(s) / 1e6:.0f} MB/s cannot carry 20 TB/24 h"
    assert s.lake.rucio.auth.type == "oidc" and s.lake.rucio.verify_upload == "adler32"


def example_policy(s: Settings) -> None:
    assert s.lake.kind == "local" and s.rules


POLICIES: dict[str, Callable[[Settings], None]] = {
    "local.toml": local_policy,
    "magic.toml": magic_policy,
    "lsst.toml": lsst_policy,
    "edge-agent.example.toml": example_policy,
}


def test_every_conf_file_has_its_policy_checked() -> None:
    assert sorted(p.name for p in CONF.glob("*.toml")) == sorted(POLICIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_conf_file_is_valid_as_shipped(name: str) -> None:
    doc = check_config(CONF / name)
    s = load(name)
    # check-config printed the same effective settings the policy below reads
    assert doc["state_dir"] == str(s.state_dir) and sorted(doc["rules"]) == sorted(s.rules)
    POLICIES[name](s)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_conf_file_holds_no_secret_and_safe_defaults(name: str) -> None:
    s = load(name)
    if s.lake.rucio is not None:
        auth = s.lake.rucio.auth
        assert auth.password is None and auth.client_secret is None, "secrets come from env or files only"
        assert s.lake.rucio.tls_verify
        assert s.lake.rucio.url.startswith("https://")
    assert s.status.host in ("127.0.0.1", "::1", "localhost"), "the status server stays on loopback"
    for rule in s.rules.values():
        assert not rule.allow_empty, "zero-byte files are quarantined, not shipped"


def test_policy_checks_can_fail() -> None:
    """The control: a config that breaks the promise (LSST without a cap) fails its check."""
    s = load("lsst.toml").model_copy(update={"bandwidth_mbps": 0.0, "windows": []})
    with pytest.raises(AssertionError):
        lsst_policy(s)
    magic = load("magic.toml")
    m1 = magic.rules["m1"].model_copy(update={"delete": DeletePolicy.NEVER})
    with pytest.raises(AssertionError):
        magic_policy(magic.model_copy(update={"rules": {**magic.rules, "m1": m1}}))
