"""Helpers for the packaging tests: running tools, installing them, reading the systemd unit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "edge-agent.service"
SYSUSERS = PACKAGING / "systemd" / "edge-agent.sysusers"
TMPFILES = PACKAGING / "systemd" / "edge-agent.tmpfiles"
CONFIG = PACKAGING / "config" / "edge-agent.toml"
SPEC = PACKAGING / "rpm" / "edge-agent.spec"
CONTAINERFILE = PACKAGING / "container" / "Containerfile"

# What the installed agent sees of the environment: nothing of the test runner's (no
# PYTHONPATH, no EDGE_AGENT_* of the CI host).
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def run(cmd: list[str | os.PathLike[str]], *, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on an unexpected exit status, fail with its whole output."""
    proc = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(*packages: str) -> str | None:
    """Install Debian packages; None on success, else why it cannot be done here."""
    if not is_root():
        return "not root"
    if shutil.which("apt-get") is None:
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # wait for a dpkg lock held by another apt (unattended-upgrades on a fresh machine, the lake
    # scripts' installs) instead of failing at once
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    cmd = [*apt, "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(cmd, capture_output=True, env=env, timeout=900, check=False).returncode == 0:
        return None
    subprocess.run([*apt, "update", "-q"], check=False, capture_output=True, env=env, timeout=900)
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    return None if p.returncode == 0 else f"apt-get install {' '.join(packages)} failed: {p.stderr[-500:]}"


def ensure_systemd() -> str | None:
    """systemd's tools (systemd-analyze, systemctl, systemd-sysusers, systemd-tmpfiles; no need
    for systemd to run): None when present or installed, else why not (a fresh Debian 12
    container image has none of them)."""
    tools = ("systemd-analyze", "systemctl", "systemd-sysusers", "systemd-tmpfiles")
    if all(shutil.which(t) for t in tools):
        return None
    return apt_install("systemd")


def unit_entries(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """The unit's settings: section -> key -> values in order (systemd allows repeated keys).
    An empty assignment resets the list, as in systemd."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"setting outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        values = current.setdefault(key.strip(), [])
        if value.strip() == "":
            values.clear()
        else:
            values.append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span ("60s", "1min 30s", "90") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "ms": 0.001, "m": 60, "min": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total
