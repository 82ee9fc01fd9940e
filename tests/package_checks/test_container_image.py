"""The container image, built and run: `scripts/package container` with podman (Debian's), then
the image moves a file as its non-root user with the buffer, the state and the lake mounted,
answers its HEALTHCHECK and stops cleanly on SIGTERM.

No registry is reachable from CI, so the Containerfile's PYTHON_IMAGE is a Debian 12 minbase
with python3 made by debootstrap from the host's Debian mirror (cached in /var/tmp between runs,
~2 min the first time). The build stage still fetches the agent's dependencies from PyPI as it
would anywhere; the host's CA bundle is handed to pip (a TLS-intercepting proxy, see the
container README). podman runs here with runc, lowered ulimits and cgroupfs (crun cannot set
RLIMIT_NOFILE in this kind of container host, see packaging-and-ops notes); a site's podman or
docker needs none of that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import project_version
from .pkgtools import ROOT, apt_install, is_root, run

pytestmark = pytest.mark.packaging

CACHE = Path("/var/tmp/edge-agent-podman")       # image storage and the base image, kept between runs
BASE = "localhost/edge-agent-base:bookworm"
AGENT_UID = 10001
# The agent's own layers on top of the base: the venv and the config, 102 MB on 2026-12-07, of
# which 64 MB are the XRootD bindings' wheel (the xroot extra: its libXrd* three times, since a
# wheel cannot carry symlinks, and the OpenSSL and Kerberos libraries it bundles). A regression to
# "pip and build tools (or a second Python) in the runtime stage" would show here.
MAX_AGENT_LAYERS_MB = 115


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], env=self.env, check=check, timeout=timeout)


def debian_mirror() -> str:
    """The host's Debian mirror (deb822 or one-line sources), for debootstrap."""
    for f in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        text = f.read_text() if f.is_file() else ""
        m = (re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.MULTILINE)
             or re.search(r"^deb\s+(\S+/debian)\s", text, re.MULTILINE))
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs() -> Path:
    """A Debian 12 minbase with python3 (3.11), venv and useradd, as a tar; made once."""
    tar = CACHE / "base-bookworm.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / "debootstrap"
    shutil.rmtree(work, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,passwd,ca-certificates",
         "bookworm", work, debian_mirror()], timeout=1200)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (work / junk).glob("*"):
            if p.is_file():
                p.unlink()
    run(["tar", "-C", work, "-cf", f"{tar}.part", "."], timeout=600)
    os.replace(f"{tar}.part", tar)               # whole or not at all
    shutil.rmtree(work, ignore_errors=True)
    return tar


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if not is_root():
        pytest.skip("podman here needs root (rootful storage under /var/tmp)")
    tools = all(shutil.which(t) for t in ("podman", "runc", "debootstrap"))
    if not tools and (why := apt_install("podman", "runc", "debootstrap")) is not None:
        pytest.skip(f"podman is missing and cannot be installed: {why}")
    conf = tmp_path_factory.mktemp("podman-conf")
    (conf / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{CACHE}/storage"\nrunroot = "{CACHE}/run"\n')
    (conf / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
           "CONTAINERS_CONF": str(conf / "containers.conf")}
    p = Podman(env)
    if p("image", "exists", BASE, check=False).returncode != 0:
        p("import", str(base_rootfs()), BASE, timeout=600)
    return p


@dataclass(frozen=True)
class Image:
    tag: str
    build_s: float
    inspect: dict


@pytest.fixture(scope="module")
def image(podman: Podman) -> Image:
    ca = "/etc/ssl/certs/ca-certificates.crt"
    opts = f"--isolation=chroot --network=host --build-arg PYTHON_IMAGE={BASE}"
    if Path(ca).is_file():
        opts += f" -v {ca}:/etc/pip-ca.crt:ro --env PIP_CERT=/etc/pip-ca.crt"
    env = {**podman.env, "CONTAINER_ENGINE": "podman", "CONTAINER_BUILD_OPTS": opts}
    t0 = time.monotonic()
    proc = run([ROOT / "scripts" / "package", "container", "--work", str(CACHE / "package-work")],
               env=env, timeout=1200)
    took = time.monotonic() - t0
    tag = f"localhost/edge-agent:{project_version()}"
    assert tag in proc.stdout, proc.stdout
    (doc,) = json.loads(podman("image", "inspect", tag).stdout)
    return Image(tag, took, doc)


def size_mb(podman: Podman, ref: str) -> float:
    (doc,) = json.loads(podman("image", "inspect", ref).stdout)
    return float(doc["Size"]) / 1e6


def test_image_runs_the_agent_as_the_rpm_does(podman: Podman, image: Image) -> None:
    cfg = image.inspect["Config"]
    assert cfg["User"] == f"{AGENT_UID}:{AGENT_UID}"
    assert sorted(cfg["Volumes"]) == ["/data/daq", "/etc/edge-agent", "/var/lib/edge-agent"]
    assert cfg["Entrypoint"] == ["edge-agent"] and cfg["Cmd"] == ["run"]
    assert "EDGE_AGENT_CONFIG=/etc/edge-agent/edge-agent.toml" in cfg["Env"]
    assert "/healthz" in " ".join(image.inspect["Healthcheck"]["Test"]), "HEALTHCHECK kept (docker format)"
    agent_mb = size_mb(podman, image.tag) - size_mb(podman, BASE)
    print(f"scripts/package container: {image.build_s:.0f} s; image {size_mb(podman, image.tag):.0f} MB, "
          f"{agent_mb:.0f} MB over the base")
    assert agent_mb < MAX_AGENT_LAYERS_MB
    out = podman("run", "--rm", "--network=none", image.tag, "--version").stdout
    assert out.strip() == f"edge-agent {project_version()}"
    out = podman("run", "--rm", "--network=none", image.tag, "check-config").stdout
    header, _, body = out.partition("\n")
    assert "/etc/edge-agent/edge-agent.toml: valid" in header and json.loads(body)["dry_run"] is True
    # nothing to build or install with in the runtime stage
    probe = podman("run", "--rm", "--network=none", "--entrypoint", "python", image.tag, "-c",
                   "import importlib.util as u; print(u.find_spec('pip') is None, __import__('os').getuid())").stdout
    assert probe.split() == ["True", str(AGENT_UID)]


@pytest.fixture
def running(podman: Podman, image: Image, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The image as the README runs it: read-only, no capabilities, buffer/state/lake mounted."""
    base = tmp_path / "site"
    for d in ("daq", "state", "lake/site-a", "lake/site-b"):
        (base / d).mkdir(parents=True)
    for lake in ("site-a", "site-b"):
        (base / "lake" / lake / ".lake-mounted").touch()
    for p in [base, *base.rglob("*")]:
        os.chown(p, AGENT_UID, AGENT_UID)
    name = f"edge-agent-test-{os.getpid()}"
    podman("run", "-d", "--name", name, "--network=none",
           "-v", f"{base}/daq:/data/daq", "-v", f"{base}/state:/var/lib/edge-agent", "-v", f"{base}/lake:/mnt/lake",
           "--read-only", "--cap-drop=ALL", "--security-opt", "no-new-privileges",
           "-e", "EDGE_AGENT_DRY_RUN=false", "-e", "EDGE_AGENT_RULES__DAQ__STABLE_SECONDS=0.5",
           "-e", "EDGE_AGENT_CONFIRM_INTERVAL_SECONDS=1", "-e", "EDGE_AGENT_LOG__FORMAT=json", image.tag)
    try:
        yield name, base
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def wait(cond, timeout: float, what: str, logs) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n{logs()}"
        time.sleep(0.5)


def test_container_moves_a_file_answers_its_healthcheck_and_stops_cleanly(
        podman: Podman, running: tuple[str, Path]) -> None:
    name, base = running

    def logs() -> str:
        p = podman("logs", name, check=False)
        return (p.stdout + p.stderr)[-3000:]

    def healthy() -> bool:
        return podman("healthcheck", "run", name, check=False).returncode == 0
    wait(healthy, 60, "HEALTHCHECK (/healthz) passes", logs)
    data = os.urandom(200_000)
    tmp = base / "daq" / "run0001.fits.part"
    tmp.write_bytes(data)
    os.chown(tmp, AGENT_UID, AGENT_UID)
    os.rename(tmp, base / "daq" / "run0001.fits")
    wait(lambda: not (base / "daq" / "run0001.fits").exists(), 60, "the file deleted after 2 copies", logs)
    copies = sorted((base / "lake").rglob("run0001.fits"))
    assert len(copies) == 2 and all(p.read_bytes() == data for p in copies), copies
    status = json.loads(podman("exec", name, "edge-agent", "status", "--json").stdout)
    assert status["rules"]["daq"]["states"]["deleted"]["files"] == 1
    assert podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip() == "healthy"
    t0 = time.monotonic()
    podman("stop", "-t", "60", name, timeout=120)
    print(f"podman stop: {time.monotonic() - t0:.1f} s")
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0", logs()
    assert '"event": "stopped"' in podman("logs", name).stdout + podman("logs", name).stderr
    ledger = base / "state" / "ledger.sqlite"
    assert ledger.stat().st_uid == AGENT_UID, "the ledger lives in the state volume, written by the agent's user"
