"""Static checks of packaging/container/Containerfile, and its HEALTHCHECK command run against a
stand-in status server. The image itself is built and run in test_container_image.py."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator

import pytest

from .pkgtools import CONFIG, CONTAINERFILE, ROOT

pytestmark = pytest.mark.packaging


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_two_stages_runtime_gets_only_the_venv() -> None:
    build, runtime = stages()
    assert build[0][1].endswith(" AS build")
    run = " ".join(args for word, args in build if word == "RUN")
    assert "pip wheel" in run and "--no-index" in run and "venv" in run
    copies = [args for word, args in runtime if word == "COPY"]
    assert any(c.startswith("--from=build /opt/edge-agent/venv") for c in copies)
    assert not any("RUN" == w and "pip " in a for w, a in runtime), "no pip in the runtime stage"


def test_the_venv_gets_the_postgres_xroot_and_schedule_extras() -> None:
    """The image's venv carries the ledger's PostgreSQL driver, the XRootD Python bindings (root://
    without an xrdcp per file) and astral (the observing night from [site]), checked by importing
    them in the build."""
    build, _ = stages()
    run = " ".join(args for word, args in build if word == "RUN")
    assert "pip wheel" in run and "'.[postgres,xroot,schedule]'" in run
    assert "'edge-agent[postgres,xroot,schedule]'" in run
    assert "import astral" in run
    assert "--only-binary xrootd" in run, "XRootD must come as the binary wheel, never built from source"
    assert "import XRootD.client" in run


def test_runtime_user_volume_ports() -> None:
    runtime = stages()[-1]
    words = [w for w, _ in runtime]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert "EXPOSE" not in words, "the status server binds loopback: nothing to expose by default"
    volumes = [v for w, a in runtime if w == "VOLUME" for v in json.loads(a)]
    assert sorted(volumes) == sorted(["/var/lib/edge-agent", "/etc/edge-agent", "/data/daq"]), \
        "volumes for the state, the config and the buffer"
    with CONFIG.open("rb") as fh:
        shipped = tomllib.load(fh)
    # the buffer volume is where the image's own config looks, and the ledger volume its state_dir
    assert {str(r["directory"]) for r in shipped["rules"].values()} <= set(volumes)
    assert shipped["state_dir"] in volumes
    assert [a for w, a in runtime if w == "ENTRYPOINT"] == ['["edge-agent"]']
    assert [a for w, a in runtime if w == "CMD"] == ['["run"]']
    env = " ".join(a for w, a in runtime if w == "ENV")
    assert "EDGE_AGENT_CONFIG=/etc/edge-agent/edge-agent.toml" in env
    text = CONTAINERFILE.read_text()
    assert "EDGE_AGENT_STATUS__HOST=0.0.0.0" in text, "explains how to expose the status server"


def test_copied_sources_exist_and_pass_the_ignore_file() -> None:
    ignore = (CONTAINERFILE.parent / "Containerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, args in instructions():
        if word != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert src.rstrip("/") in allowed, f"COPY {src}: excluded by Containerfile.dockerignore"


def healthcheck_argv() -> list[str]:
    args = next(a for w, a in instructions() if w == "HEALTHCHECK")
    cmd = args[args.index("CMD") + 3:].strip()
    argv = json.loads(cmd)
    assert argv[0] == "python" and "/healthz" in argv[2] and "urllib" in argv[2]
    return argv


class _Health(http.server.BaseHTTPRequestHandler):
    code = 200

    def do_GET(self) -> None:
        self.send_response(self.code if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("code, healthy", [(200, True), (503, False)])
def test_healthcheck_command(status_server: http.server.HTTPServer, code: int, healthy: bool) -> None:
    """The exact HEALTHCHECK command, with the image's `python` replaced by this one."""
    _Health.code = code
    argv = [sys.executable, *healthcheck_argv()[1:]]
    env = {**os.environ, "EDGE_AGENT_STATUS__PORT": str(status_server.server_address[1])}
    proc = subprocess.run(argv, env=env, check=False, capture_output=True, text=True, timeout=30)
    assert (proc.returncode == 0) == healthy, f"{shlex.join(argv)}: {proc.returncode} {proc.stderr[-300:]}"


def test_readme_explains_podman_and_docker() -> None:
    """The container's README covers both engines: run, health, the volumes, the clean stop."""
    text = (CONTAINERFILE.parent / "README.md").read_text()
    for needed in ("podman build", "docker build", "podman run", "docker run", "podman healthcheck run",
                   "docker inspect --format '{{.State.Health.Status}}'", "--stop-timeout 60",
                   "/var/lib/edge-agent", "/etc/edge-agent", "/data/daq", "EDGE_AGENT_STATUS__HOST=0.0.0.0"):
        assert needed in text, f"packaging/container/README.md does not mention {needed!r}"
    for engine in ("podman", "docker"):
        run_cmd = re.search(rf"(?s){engine} run -d .*?localhost/edge-agent", text)
        assert run_cmd, f"no `{engine} run -d ...` example"
        for volume in ("/etc/edge-agent", "/var/lib/edge-agent", "/data/daq"):
            assert f":{volume}" in run_cmd.group(0), f"the {engine} example does not mount {volume}"
