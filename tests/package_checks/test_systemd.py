"""The systemd unit (packaging/systemd/edge-agent.service) and its sysusers.d/tmpfiles.d files.

`systemd-analyze verify` warns about typos (ProtectSytem=, Restart=on-failur, ...) and still
exits 0, so any output at all is a failure here. It also insists that ExecStart's binary exists:
these tests verify a copy of the unit whose /usr/bin/edge-agent is replaced by the project's own
`edge-agent` console script (the same program; verify only checks that it is executable). The
unmodified unit, with /usr/bin/edge-agent really installed by the RPM, is verified in
test_rpm.py::test_unmodified_unit_verifies_in_installed_root."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from .pkgtools import CONFIG, SYSUSERS, TMPFILES, UNIT, ensure_systemd, run, seconds, unit_entries

pytestmark = pytest.mark.packaging

# The agent waits up to this long for steps in flight after SIGTERM (runner.shutdown).
AGENT_STOP_GRACE_S = 30


@pytest.fixture(scope="module")
def analyze() -> str:
    if (why := ensure_systemd()) is not None:
        pytest.skip(f"systemd-analyze is missing and cannot be installed: {why}")
    return shutil.which("systemd-analyze") or "systemd-analyze"


def agent_executable(tmp: Path) -> Path:
    """An existing executable to stand in for /usr/bin/edge-agent."""
    for candidate in (Path(sys.executable).with_name("edge-agent"), shutil.which("edge-agent")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    stub = tmp / "edge-agent"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -m edge_agent \"$@\"\n")
    stub.chmod(0o755)
    return stub


def unit_copy(tmp: Path, text: str | None = None) -> Path:
    d = tmp / "units"
    d.mkdir(exist_ok=True)
    text = UNIT.read_text() if text is None else text
    assert text.count("/usr/bin/edge-agent") == 2, "ExecStartPre and ExecStart run /usr/bin/edge-agent"
    path = d / "edge-agent.service"   # verify and security take the unit's name from the file
    path.write_text(text.replace("/usr/bin/edge-agent", str(agent_executable(tmp))))
    return path


def test_verify_prints_nothing(analyze: str, tmp_path: Path) -> None:
    proc = run([analyze, "verify", unit_copy(tmp_path)], check=False)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("good, typo", [
    ("ProtectSystem=strict", "ProtectSytem=strict"),
    ("Restart=on-failure", "Restart=on-failur"),
    ("SystemCallFilter=@system-service", "SystemCallFilter=@sytem-service"),
])
def test_verify_output_catches_typos(analyze: str, tmp_path: Path, good: str, typo: str) -> None:
    """The control: these typos exit 0 but print a warning, which the test above would catch."""
    text = UNIT.read_text()
    assert good in text
    proc = run([analyze, "verify", unit_copy(tmp_path, text.replace(good, typo, 1))], check=False)
    assert proc.stdout + proc.stderr != "", f"verify said nothing about {typo}"


def test_security_exposure_is_low(analyze: str, tmp_path: Path) -> None:
    # --threshold is on the 0-100 scale: 30 = an overall exposure of 3.0
    proc = run([analyze, "security", "--offline=true", "--threshold=30", unit_copy(tmp_path)], check=False)
    m = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(f"systemd-analyze security: {m.group(1)}")
    assert proc.returncode == 0 and float(m.group(1)) < 3.0, proc.stdout


def test_unit_runs_the_agent_as_brief() -> None:
    u = unit_entries()
    s = u["Service"]
    assert s["Type"] in (["exec"], ["simple"])
    assert s["User"] == ["edge-agent"] and s["Group"] == ["edge-agent"]
    env = dict(v.split("=", 1) for v in s.get("Environment", []))
    config = env.get("EDGE_AGENT_CONFIG", "/etc/edge-agent/edge-agent.toml")
    assert config == "/etc/edge-agent/edge-agent.toml"
    pre = " ".join(s["ExecStartPre"]).replace("${EDGE_AGENT_CONFIG}", config)
    start = " ".join(s["ExecStart"]).replace("${EDGE_AGENT_CONFIG}", config)
    assert pre == "/usr/bin/edge-agent check-config /etc/edge-agent/edge-agent.toml"
    assert start == "/usr/bin/edge-agent -c /etc/edge-agent/edge-agent.toml run"
    assert s["Restart"] == ["on-failure"]
    assert seconds(s["RestartSec"][0]) >= 5, "no tight restart loop"
    stop = seconds(s["TimeoutStopSec"][0])
    assert stop >= AGENT_STOP_GRACE_S + 15, f"TimeoutStopSec={stop:g}s leaves no room for the 30 s grace"
    assert s.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in " ".join(u["Unit"]["After"])


def test_unit_hardening() -> None:
    s = unit_entries()["Service"]
    expected = {"ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
                "NoNewPrivileges": "true", "PrivateDevices": "true", "ProtectKernelTunables": "true",
                "ProtectKernelModules": "true", "ProtectControlGroups": "true", "RestrictSUIDSGID": "true",
                "RestrictNamespaces": "true", "LockPersonality": "true", "SystemCallArchitectures": "native"}
    for key, value in expected.items():
        assert s.get(key) == [value], f"{key}={s.get(key)}, expected {value}"
    assert set(" ".join(s["RestrictAddressFamilies"]).split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert s["SystemCallFilter"][0] == "@system-service"
    assert s.get("CapabilityBoundingSet", []) == [], "no capabilities at all"
    # /proc must show other users' processes: the `closed` policy and the last check before a
    # deletion look there for writers (hidden processes would look like "no writer").
    assert s.get("ProtectProc", ["default"]) == ["default"]
    assert "ProcSubset" not in s and "PrivateUsers" not in s


def test_writable_paths_match_the_packaged_config() -> None:
    """The ledger's directory is writable; the DAQ buffer and lake paths of the packaged config
    are what the commented ReadWritePaths line (the operators' template) names."""
    s = unit_entries()["Service"]
    cfg = tomllib.loads(CONFIG.read_text())
    writable = " ".join(s["ReadWritePaths"]).split()
    assert cfg["state_dir"] in writable
    assert s["StateDirectory"] == [PurePosixPath(cfg["state_dir"]).name]
    commented = [line for line in UNIT.read_text().splitlines() if line.startswith("#ReadWritePaths=")]
    assert commented, "a commented ReadWritePaths= line for the DAQ buffer and the lake mounts"
    template = [PurePosixPath(p) for p in commented[0].split("=", 1)[1].split()]
    needed = [r["directory"] for r in cfg["rules"].values()] + [d["path"] for d in cfg["destinations"].values()]
    for path in map(PurePosixPath, needed):
        assert any(path == t or t in path.parents for t in template), f"{path} is not under {template}"


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles accept the files and make the user and the 0750
    state directory (in a scratch root)."""
    if (why := ensure_systemd()) is not None:
        pytest.skip(f"systemd-sysusers/systemd-tmpfiles are missing and cannot be installed: {why}")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = run(["systemd-sysusers", f"--root={root}", SYSUSERS.resolve()])
    assert "Failed" not in proc.stderr and "not valid" not in proc.stderr, proc.stderr
    entry = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                 if line.startswith("edge-agent:"))
    uid, gid, home, shell = int(entry[2]), int(entry[3]), entry[5], entry[6]
    assert home == "/var/lib/edge-agent" and shell.endswith("nologin") and uid < 1000
    proc = run(["systemd-tmpfiles", f"--root={root}", "--create", TMPFILES.resolve()])
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    st = (root / "var/lib/edge-agent").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, uid, gid)
