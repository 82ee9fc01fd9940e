"""Fixtures of the packaging tests: the RPM is built once per session (scripts/package rpm,
~20-40 s), then installed files-only into a bare root and, with its scriptlets, into an overlay
of the host's /."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .pkgtools import ROOT, apt_install, ensure_systemd, is_root, run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "packaging: builds and checks the RPM, the systemd unit and the "
                                       "container files (needs root for rpm/apt; ~1 min)")


@dataclass(frozen=True)
class Build:
    rpm: Path
    srpm: Path
    work: Path           # scripts/package --work: holds the rpmbuild tree (and its BUILDROOT)
    version: str
    seconds: float
    output: str


def project_version() -> str:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="session")
def rpm_build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """scripts/package rpm, into a scratch dist/ (the tree's dist/ is left alone)."""
    if shutil.which("rpmbuild") is None and not (is_root() and (shutil.which("apt-get") or shutil.which("dnf"))):
        pytest.skip("rpmbuild is missing and cannot be installed here (needs root and apt-get or dnf)")
    base = tmp_path_factory.mktemp("rpm-build")
    out, work = base / "dist", base / "work"
    t0 = time.monotonic()
    proc = subprocess.run([str(ROOT / "scripts" / "package"), "rpm", "--out", str(out), "--work", str(work)],
                          check=False, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"scripts/package rpm failed:\n{proc.stdout}\n{proc.stderr}"
    printed = [Path(line) for line in proc.stdout.split()]
    rpms = [p for p in printed if p.name.endswith(".rpm") and not p.name.endswith(".src.rpm")]
    srpms = [p for p in printed if p.name.endswith(".src.rpm")]
    assert len(rpms) == 1 and len(srpms) == 1, f"scripts/package should print the RPM and the SRPM:\n{proc.stdout}"
    assert rpms[0].parent == out and rpms[0].is_file() and srpms[0].is_file()
    return Build(rpms[0], srpms[0], work, project_version(), took, proc.stdout + proc.stderr)


def rpm_install(root: Path, package: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Debian's rpm database is not the root's: name it. Debian's rpm prints an "use Alien" note.
    return run(["rpm", "--root", root, "--dbpath", "/var/lib/rpm", "-i", "--nodeps", *extra, package])


@pytest.fixture(scope="session")
def files_root(rpm_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RPM's files in a bare directory, no scriptlets (the user does not exist: root owns)."""
    if not is_root():
        pytest.skip("rpm -i into a root directory must chown files: needs root")
    root = tmp_path_factory.mktemp("files-root")
    rpm_install(root, rpm_build.rpm, "--noscripts")
    return root


@pytest.fixture(scope="session")
def overlay_root(rpm_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The host's / under an overlay (changes go to a tmpfs), /dev and /proc mounted, and the RPM
    installed there WITH its scriptlets: a real install on a copy of this Debian host, which has
    /usr/bin/python3.11, systemctl, systemd-tmpfiles and useradd like an EL9 host."""
    if not is_root():
        pytest.skip("mounting an overlay of / needs root")
    if (why := None if shutil.which("runuser") else apt_install("util-linux")) is not None:
        pytest.skip(f"runuser missing: {why}")
    # the scriptlets call systemctl and systemd-tmpfiles when present (they are on EL9)
    if (why := ensure_systemd()) is not None:
        pytest.skip(f"systemd's tools are missing and cannot be installed: {why}")
    base = tmp_path_factory.mktemp("overlay")
    tmpfs, merged = base / "t", base / "m"
    tmpfs.mkdir()
    merged.mkdir()
    mounted: list[Path] = []
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=False, capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount here (unprivileged container?): {p.stderr.strip()}")
        mounted.append(tmpfs)
        (tmpfs / "upper").mkdir()
        (tmpfs / "work").mkdir()
        p = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir=/,upperdir={tmpfs}/upper,workdir={tmpfs}/work", str(merged)],
                           check=False, capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount an overlay of /: {p.stderr.strip()}")
        mounted.append(merged)
        # scriptlets write to /dev/null (without /dev it would become a regular file)
        run(["mount", "--bind", "/dev", merged / "dev"])
        mounted.append(merged / "dev")
        run(["mount", "-t", "proc", "proc", merged / "proc"])
        mounted.append(merged / "proc")
        # a fresh rpm database and no leftovers of an earlier install on this host
        for leftover in ("var/lib/rpm", "opt/edge-agent", "etc/edge-agent", "var/lib/edge-agent"):
            shutil.rmtree(merged / leftover, ignore_errors=True)
        rpm_install(merged, rpm_build.rpm)
        yield merged
    finally:
        for m in reversed(mounted):
            if subprocess.run(["umount", str(m)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)
